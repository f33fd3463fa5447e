"""Tempo long-video question answering for Hugging Face transformers.

Importing this package registers Tempo with transformers' Auto classes (config, model, processor)
and the `video-question-answering` pipeline task.

The import itself is instant: torch and transformers are imported only when they are needed. The
public names (``TempoConfig``, ``load_video``, ...) are imported from their modules on first use,
and the registration runs as soon as transformers is imported, by anyone: right away if it already
is, else at the end of that import. So ``import transformers_tempo`` followed by
``AutoModel.from_pretrained(...)`` works as if everything had been imported up front, and the
``tempo`` command can print its help or an argument error without loading torch.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading

from .lazy_exports import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "TempoConfig": "configuration_tempo",
    "TempoForConditionalGeneration": "modeling_tempo",
    "TempoModel": "modeling_tempo",
    "TempoPreTrainedModel": "modeling_tempo",
    "TempoCausalLMOutputWithPast": "modeling_tempo",
    "TempoProcessor": "processing_tempo",
    "PendingVideo": "processing_tempo",
    "TempoVideoProcessor": "video_processing_tempo",
    "VideoQuestionAnsweringPipeline": "pipeline_tempo",
    "LoadedVideo": "video_loading",
    "VideoLoadError": "video_loading",
    "load_video": "video_loading",
    "StreamedVideo": "streaming",
    "compress_streaming": "streaming",
    "generate_streaming": "streaming",
    "allocate_tokens": "token_allocation",
    "select_tokens": "token_allocation",
    "ATA_OPTION_NAMES": "token_allocation",
    "TempoVideoMetadata": "video_loading",
    "VisionFeatures": "modeling_tempo",
    "VideoChat": "chat",
    "VideoCache": "video_cache",
    "configure_video_cache": "video_cache",
    "default_video_cache": "video_cache",
    "reference_settings": "reference",
    "REFERENCE_SETTINGS": "reference",
    "RELEASED_BUDGETS": "reference",
    "apply_reference_precision": "reference",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


# ------------------------------------------------------------------------------ registration
_registered = False
_register_lock = threading.RLock()


def register() -> None:
    """Register Tempo with AutoConfig, AutoModel (and the image/multimodal-text-to-text auto classes),
    AutoProcessor and the `video-question-answering` pipeline task. Idempotent; runs by itself."""
    global _registered
    with _register_lock:
        if _registered:
            return
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForImageTextToText,
            AutoModelForMultimodalLM,
            AutoProcessor,
        )

        from .configuration_tempo import TempoConfig
        from .modeling_tempo import TempoForConditionalGeneration
        from .pipeline_tempo import register_pipeline
        from .processing_tempo import TempoProcessor

        AutoConfig.register("tempo", TempoConfig, exist_ok=True)
        # What users write is `AutoModel.from_pretrained(...)`: it returns the full generation model,
        # and so do the auto classes transformers uses for image/video-text-to-text generation.
        for auto in (AutoModel, AutoModelForImageTextToText, AutoModelForMultimodalLM):
            auto.register(TempoConfig, TempoForConditionalGeneration, exist_ok=True)
        AutoProcessor.register(TempoConfig, TempoProcessor, exist_ok=True)
        register_pipeline()
        _registered = True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `register()` once transformers has been imported.

    It watches two kinds of imports: `transformers` itself, and this package's own modules (which
    import transformers at their top). When transformers finishes importing while one of this
    package's modules is still half-imported, registering right then would import that module again
    half-made; so the registration waits until the outermost of this package's modules is done.
    """

    def __init__(self):
        self.package_depth = 0  # this package's modules being executed right now
        self.pending = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers" and not fullname.startswith(__name__ + "."):
            return None
        for finder in sys.meta_path:  # the spec the import would get without us
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RunAfter(spec.loader, self, is_package_module=fullname != "transformers")
        return spec

    def transformers_imported(self) -> None:
        if self.package_depth:
            self.pending = True
        else:
            self.done()

    def done(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        register()


class _RunAfter(importlib.abc.Loader):
    """A module loader that calls back into `_RegisterAfterImport` after the module executes."""

    def __init__(self, loader, watcher: _RegisterAfterImport, is_package_module: bool):
        self.loader, self.watcher, self.is_package_module = loader, watcher, is_package_module

    def __getattr__(self, name):  # get_code, get_source, is_package, get_resource_reader, ...
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # Everything that looks at the module later sees its real loader.
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        watcher = self.watcher
        if not self.is_package_module:
            self.loader.exec_module(module)
            watcher.transformers_imported()
            return
        watcher.package_depth += 1
        try:
            self.loader.exec_module(module)
        finally:
            watcher.package_depth -= 1
        if watcher.pending and not watcher.package_depth:
            watcher.pending = False
            watcher.done()


if "transformers" in sys.modules:
    register()
else:
    sys.meta_path.insert(0, _RegisterAfterImport())
