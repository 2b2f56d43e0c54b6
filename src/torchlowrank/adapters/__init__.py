"""Adapters for fine-tuning: LoRA and Deep LoRA (DESIGN §4.3) on any PyTorch / Hugging Face model.

cfg = tlr.DeepLoRAConfig(r=8, modules_to_save=["classifier"])
tlr.adapt(model, cfg)                       # in place; freezes the base
tlr.init_compressed(model, batch)           # compressed Deep LoRA: factors from one gradient
opt = torch.optim.AdamW(tlr.adapter_param_groups(model, lr=1e-3))
...
tlr.save_adapter(model, "run/adapter"); tlr.export_peft(model, "run/peft"); tlr.merge(model)
"""

from .compressed import compressed_factors, end_to_end_gradients, init_compressed, random_semi_orthogonal
from .config import DeepLoRAConfig, GeoLoRAConfig, LoRAConfig, config_from_dict
from .geolora import GeoLoRAAdapter, GeoLoRAUnit, adapter_ranks, geolora_optimizer, rebalance_ranks
from .io import AdapterBaseMismatchWarning, NormBuffersNotSavedWarning, load_adapter, save_adapter
from .layers import (
    AdapterLayer,
    Conv1DAdapter,
    Conv2dAdapter,
    EmbeddingAdapter,
    LinearAdapter,
    supported_layer,
)
from .model import (
    AdapterNotCalledWarning,
    AdapterState,
    adapt,
    adapter_layers,
    adapter_param_groups,
    merge,
    print_trainable_parameters,
    resize_token_embeddings,
    unadapt,
)
from .peft_export import export_peft

__all__ = [
    "LoRAConfig",
    "DeepLoRAConfig",
    "GeoLoRAConfig",
    "GeoLoRAAdapter",
    "GeoLoRAUnit",
    "geolora_optimizer",
    "rebalance_ranks",
    "adapter_ranks",
    "config_from_dict",
    "adapt",
    "merge",
    "unadapt",
    "init_compressed",
    "adapter_param_groups",
    "save_adapter",
    "load_adapter",
    "export_peft",
    "print_trainable_parameters",
    "AdapterLayer",
    "LinearAdapter",
    "Conv1DAdapter",
    "Conv2dAdapter",
    "EmbeddingAdapter",
    "AdapterState",
    "adapter_layers",
    "compressed_factors",
    "end_to_end_gradients",
    "random_semi_orthogonal",
    "supported_layer",
    "resize_token_embeddings",
    "AdapterNotCalledWarning",
    "NormBuffersNotSavedWarning",
    "AdapterBaseMismatchWarning",
]
