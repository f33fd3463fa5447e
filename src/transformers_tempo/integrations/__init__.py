"""Bridges to evaluation frameworks; each one is imported only by the framework that uses it.

`lmms_eval_models` is the payload of this package's `lmms_eval.models` entry point: lmms-eval
(0.7 and later) calls it while building its model registry, so `--model tempo` resolves to
`transformers_tempo.integrations.lmms_eval.Tempo`. It imports nothing heavy: the adapter module
(torch, transformers, the model) is imported only when a run asks for `tempo`.
"""

LMMS_EVAL_MODEL_NAME = "tempo"
LMMS_EVAL_CLASS_PATH = "transformers_tempo.integrations.lmms_eval.Tempo"


def lmms_eval_models():
    """The `ModelManifest` lmms-eval registers for `--model tempo`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_NAME, simple_class_path=LMMS_EVAL_CLASS_PATH)
