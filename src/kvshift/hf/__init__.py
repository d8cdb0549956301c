"""transformers integration (the `hf` extra): KVShiftConfig / KVShiftForCausalLM, registered with
AutoConfig and AutoModelForCausalLM on import (no trust_remote_code), checkpoint export, the
Llama converter, and what a model directory is (`resolve_model_dir`: run, checkpoint or transformers).

    import kvshift.hf
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported_dir")
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # keep the missing module's name: the CLI hides these commands then
    raise ImportError("kvshift.hf needs the 'hf' extra: pip install 'kvshift[hf]'", name=e.name) from e

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import MODEL_TYPE, KVShiftConfig
from .modeling import KVShiftCache, KVShiftForCausalLM, KVShiftPreTrainedModel

AutoConfig.register(MODEL_TYPE, KVShiftConfig, exist_ok=True)
AutoModelForCausalLM.register(KVShiftConfig, KVShiftForCausalLM, exist_ok=True)

from .convert import convert_llama, export_checkpoint  # noqa: E402
from .model_dir import load_training_checkpoint, resolve_model_dir  # noqa: E402

__all__ = ["KVShiftConfig", "KVShiftForCausalLM", "KVShiftPreTrainedModel", "KVShiftCache", "convert_llama",
           "export_checkpoint", "load_training_checkpoint", "resolve_model_dir"]
