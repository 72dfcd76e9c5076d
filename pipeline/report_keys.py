"""The quality metrics an evaluation report leads with (HEADLINE) and their printed names (LABELS).

Shared by the evaluation's report (evaluate/report.py) and the model card (card.py), which must not
import the evaluation phase.
"""

from __future__ import annotations

HEADLINE = ("rouge1", "rouge2", "rougeL", "rougeLsum", "similarity_reference", "nli_entailment")
LABELS = {
    "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
    "similarity_reference": "Sim(out, ref)", "similarity_source": "Sim(out, src)", "nli_entailment": "NLI entail.",
}
