"""kdpipe phase one/two/evaluation."""
