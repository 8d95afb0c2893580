"""Fine-tuning methods: each one declares how it sets up, lays out batches, scores and merges.

`full` trains the weights themselves (optionally keeping embeddings or the first blocks
fixed); every other method is a PEFT config on top of a frozen base: `lora` (with rsLoRA,
DoRA and fully trained extra modules), `qlora` (LoRA on a 4-bit NF4 base, CUDA only),
`prompt_tuning` and `prefix_tuning` (learned virtual tokens), and `ia3` (learned scaling
vectors). All of them go through the same training loop and the same evaluators, which ask
the `Method` rather than branching on names:

| method | batch layout | label log-likelihood | merges into plain weights |
|---|---|---|---|
| full, lora, qlora, ia3 | packed rows, block-diagonal mask | token tries, one packed pass | yes |
| prompt_tuning, prefix_tuning | right-padded rows (virtual tokens go in front) | each candidate as a padded row | no |
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from finesmith.config import PREFERENCE_OBJECTIVES, ROW_TOKENS, PreferenceSettings, TrainConfig
from finesmith.data.pack import pack_batch, pad_batch
from finesmith.data.tokenize import TokenizedExample
from finesmith.errors import FinesmithError
from finesmith.model.attention import has_sliding_window, use_packed_attention
from finesmith.model.load import load_model, resolve_model_path
from finesmith.model.merge import merge_adapter
from finesmith.train.objectives import sft_loss, virtual_sft_loss

Objective = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
Collate = Callable[[Sequence[TokenizedExample]], dict[str, torch.Tensor]]
PACKED, PADDED = "packed", "padded"


@dataclass(frozen=True)
class Method:
    """What the loop and the evaluators need to know about a method.

    Attributes:
        name: the config value (`method: lora`).
        adapter: saved as a PEFT adapter on a frozen base (else the whole model is saved).
        layout: `packed` (padding-free rows, block mask) or `padded` (virtual tokens in front).
        mergeable: folds into plain weights (`export --format hf|gguf`, staged runs).
    """

    name: str
    adapter: bool
    layout: str
    mergeable: bool

    def collate(self, row_tokens: int | None = ROW_TOKENS, objective: str = "sft",
                share_prompt: bool = True, attention: str = "dense") -> Collate:
        """The batch layout this method trains and evaluates on with `objective`.

        `attention: varlen` (SFT on the packed layout) makes one padding-free row with its
        sequence boundaries instead of rows with a dense block mask (`finesmith.model.attention`).
        """
        if objective in PREFERENCE_OBJECTIVES:
            self.check_objective(objective)
            from finesmith.data.pairs import pack_groups

            return functools.partial(pack_groups, row_tokens=row_tokens, share_prompt=share_prompt)
        if self.layout == PADDED:
            return pad_batch
        if attention == "varlen":
            from finesmith.model.attention import pack_varlen

            return pack_varlen
        return functools.partial(pack_batch, row_tokens=row_tokens)

    def objective(self, name: str = "sft", preference: PreferenceSettings | None = None) -> Objective:
        """The loss over one batch of this layout, returning `(sum, count)`.

        `sft` and `cpt` share the token-level cross-entropy: they differ only in which
        tokens the data marks as trained. The preference objectives score token tries
        (`finesmith.train.preference`).
        """
        if name in PREFERENCE_OBJECTIVES:
            self.check_objective(name)
            from finesmith.train.preference import PreferenceObjective

            return PreferenceObjective(name, preference or PreferenceSettings())
        if name not in ("sft", "cpt"):
            raise FinesmithError(f"objective '{name}' is not available")
        return virtual_sft_loss if self.layout == PADDED else sft_loss

    def check_objective(self, name: str) -> None:
        """Refuse (one line) an objective this method's batch layout cannot compute."""
        if name in PREFERENCE_OBJECTIVES and self.layout == PADDED:
            raise FinesmithError(f"objective {name} scores answers in packed token tries, which {self.name} "
                                 "(virtual tokens in front of every row) cannot take; use method lora, ia3 or full")

    def merge(self, model: Any) -> Any:
        """The model as one plain transformers model (see `finesmith.model.merge.merge_adapter`)."""
        if not self.mergeable:
            raise FinesmithError(f"a {self.name} run trained virtual prompt tokens, which cannot be merged into the "
                                 "weights; use `finesmith export RUN --format adapter` (and load it with peft)")
        return merge_adapter(model)


METHODS = {
    "full": Method("full", adapter=False, layout=PACKED, mergeable=True),
    "lora": Method("lora", adapter=True, layout=PACKED, mergeable=True),
    "qlora": Method("qlora", adapter=True, layout=PACKED, mergeable=True),
    "ia3": Method("ia3", adapter=True, layout=PACKED, mergeable=True),
    "prompt_tuning": Method("prompt_tuning", adapter=True, layout=PADDED, mergeable=False),
    "prefix_tuning": Method("prefix_tuning", adapter=True, layout=PADDED, mergeable=False),
}
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning"}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FinesmithError(f"unknown method '{name}'; use one of {', '.join(METHODS)}")
    return METHODS[name]


def method_of(model: Any) -> Method:
    """The method a loaded model was trained with: its PEFT type, or `full` for a plain model."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return METHODS["full"]
    kind = getattr(config.peft_type, "value", str(config.peft_type))
    if kind not in PEFT_TYPES:
        raise FinesmithError(f"adapters of type {kind} are not supported; use lora, ia3, prompt or prefix tuning")
    return METHODS[PEFT_TYPES[kind]]


def check_method_supported(config: TrainConfig) -> None:
    """Fail before any model is loaded when the method cannot run on this machine.

    Loading a model takes minutes for large ones; finding out afterwards that 4-bit
    quantisation needs a GPU wastes them.
    """
    get_method(config.method)
    if config.method == "qlora":
        if not torch.cuda.is_available():
            raise FinesmithError("method qlora needs a CUDA GPU (4-bit NF4 weights via bitsandbytes) and none is "
                                 "available; use --method lora on this machine")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise FinesmithError("method qlora needs bitsandbytes; install it with `pip install 'finesmith[qlora]'`")
        if resolve_model_path(config.model)[1] is not None:
            raise FinesmithError(f"method qlora cannot quantise a .gguf file ({config.model}); "
                                 "pass a Hugging Face model folder or use --method lora")


def load_base_model(config: TrainConfig, device: str) -> Any:
    """The base model the method starts from, stored as the precision policy says.

    - `qlora`: 4-bit NF4 weights (bf16 compute).
    - an adapter method in bf16 (`precision: auto` on CUDA, or `bf16`): the frozen base in
      bf16, half the memory of fp32; the adapter's weights are kept in fp32 (`keep_trained_in_fp32`).
    - full fine-tuning, or fp32: float32 weights (full fine-tuning keeps fp32 master weights and
      computes under bf16 autocast when the precision is bf16).
    """
    from finesmith.core.device import training_precision

    check_method_supported(config)
    if config.method != "qlora":
        bf16 = training_precision(config.precision, device) == "bf16" and config.method != "full"
        return load_model(config.model, device, torch.bfloat16 if bf16 else torch.float32)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    path, _ = resolve_model_path(config.model)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": torch.cuda.current_device()})
    return use_packed_attention(model) if has_sliding_window(model) else model


def qlora_base_for_merging(spec: str, device: str) -> Any:
    """The base a QLoRA adapter was trained on: the NF4-quantised weights, dequantised to fp32.

    A QLoRA adapter learned to correct `dequant(NF4(W))`, not `W`; merging it into the
    original weights (what a plain reload does) silently adds the quantisation error back.
    On CUDA the base is quantised exactly as in training and dequantised; without CUDA the
    original weights are used, with a warning, and `export --verify` shows the difference.
    """
    from finesmith.core.console import console

    if not torch.cuda.is_available():
        console.print("[yellow]warning:[/] this QLoRA run trained on a 4-bit base, which needs CUDA to rebuild; "
                      "using the original weights (outputs differ by the quantisation error; use a GPU to export)")
        return load_model(spec, device)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    path, _ = resolve_model_path(spec)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": torch.cuda.current_device()})
    model = model.dequantize()  # NF4 -> the weights training actually saw
    if has_sliding_window(model):
        use_packed_attention(model)
    return model.to(device=device, dtype=torch.float32)


def keep_trained_in_fp32(model: Any) -> Any:
    """Trainable parameters in float32 (master weights), whatever the frozen ones are stored in."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def apply_method(model: Any, config: TrainConfig) -> Any:
    """Return the model to train, set up for `config.method`.

    Args:
        model: the base model (from `load_base_model`).
        config: the run config; reads `method` and its section (`full`, `lora`, `prompt`).
    Returns:
        The model itself (full) or a PEFT wrapper whose only trainable parameters are the method's.
    """
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (PEFT) without extra hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.method == "full":
        return freeze_for_full(model, config.full.freeze_embeddings, config.full.freeze_layers)
    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    from peft import get_peft_model

    try:
        with quiet_expert_rank_warning():
            return get_peft_model(model, peft_config(config, model))
    except ValueError as exc:
        if "ParamWrapper does not work with" in str(exc):
            raise FinesmithError(
                f"config: this mixture-of-experts model's experts get LoRA adapters as fused parameters, which peft "
                f"cannot combine with lora.dropout or lora.use_dora ({exc}); set lora.dropout=0 and "
                "lora.use_dora=false, or list lora.target_modules without the experts "
                "(e.g. [q_proj, k_proj, v_proj, o_proj])") from None
        raise FinesmithError(f"config: method {config.method} does not fit this model ({exc}); "
                             "check lora.target_modules / lora.modules_to_save") from None


@contextlib.contextmanager
def quiet_expert_rank_warning() -> Iterator[None]:
    """Hide peft's warning that a mixture-of-experts model's rank pattern matched no module.

    peft renames the expert targets of the v4 layout (`gate_proj`, `up_proj`) to the fused
    `gate_up_proj` parameter with twice the rank, then warns that this rank pattern matched no
    *module*: it did match the parameter (the adapters have that rank), so the warning only confuses.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match",
                                category=RuntimeWarning)
        yield


def expert_parameters(model: Any) -> list[str]:
    """Short names of a mixture-of-experts model's fused expert weights (e.g. `gate_up_proj`, `down_proj`).

    transformers 5 stores the experts of a layer as one 3-D parameter per projection
    (`[experts, out, in]`) instead of one `nn.Linear` each, so `all-linear` (which looks for
    linear modules) does not see them; peft adapts them through `target_parameters`, one LoRA
    per expert.
    """
    return sorted({name.rsplit(".", 1)[-1] for name, param in model.named_parameters()
                   if param.ndim == 3 and ".experts." in f".{name}"})


def peft_config(config: TrainConfig, model: Any = None) -> Any:
    """The PEFT config object for a non-full method.

    LoRA with `target_modules: all-linear` on a mixture-of-experts `model` also adapts every
    expert (`target_parameters`, see `expert_parameters`), as `all-linear` did when experts were
    linear layers; the router stays as `all-linear` reaches it. peft converts the same for the
    model types it knows (Qwen-MoE, Mixtral, DeepSeek, OLMoE, ...); naming the parameters here
    covers the ones it does not.
    """
    import peft

    if config.method in ("lora", "qlora"):
        lora = config.lora
        all_linear = isinstance(lora.target_modules, str) and lora.target_modules.lower() == "all-linear"
        experts = expert_parameters(model) if model is not None and all_linear else []
        return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, target_parameters=experts or None,
                               use_rslora=lora.use_rslora, use_dora=lora.use_dora,
                               modules_to_save=lora.modules_to_save, task_type="CAUSAL_LM")
    if config.method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=config.prompt.virtual_tokens, task_type="CAUSAL_LM")
    if config.method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=config.prompt.virtual_tokens, task_type="CAUSAL_LM")
    if config.method == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM")
    raise FinesmithError(f"unknown method '{config.method}'")


def freeze_for_full(model: Any, freeze_embeddings: bool, freeze_layers: int) -> Any:
    """Make every weight trainable except the input embeddings and/or the first N blocks."""
    for param in model.parameters():
        param.requires_grad_(True)
    if freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if freeze_layers:
        blocks = transformer_blocks(model)
        if freeze_layers > len(blocks):
            raise FinesmithError(f"config: full.freeze_layers is {freeze_layers} but the model has {len(blocks)} "
                                 "blocks; use a smaller number")
        for block in blocks[:freeze_layers]:
            block.requires_grad_(False)
    return model


def transformer_blocks(model: Any) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (the ModuleList with one entry per hidden layer)."""
    n_layers = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise FinesmithError("config: full.freeze_layers needs a model with a list of decoder blocks; "
                         "this architecture has none, so leave it at 0")


def trained_in_full(model: Any) -> list[str]:
    """Short names of modules an adapter run trains as full copies (peft `modules_to_save`)."""
    config = getattr(model, "active_peft_config", None)
    return sorted(getattr(config, "modules_to_save", None) or []) if config is not None else []


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts (4-bit weights count as their logical size)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_logical_numel(p) for p in model.parameters())
    return trainable, total


def _logical_numel(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte and keeps the real shape in quant_state.
    quant_state = getattr(param, "quant_state", None)
    return int(torch.Size(quant_state.shape).numel()) if quant_state is not None else param.numel()


def load_for_inference(model: str, adapter: str | None = None, device: str = "cpu",
                       precision: str = "fp32") -> tuple[Any, Any]:
    """Load (model, tokenizer) for evaluation, chat, serving or export.

    `precision` (`fp32`, `bf16`, `fp16` or `auto`, see `finesmith.core.device.inference_dtype`)
    casts the loaded model, adapter included, for inference; export and merges keep fp32.

    `model` may be a base model spec, a finesmith run folder or one of its checkpoint folders
    (`RUN/checkpoints/step-N`: the run's base and tokenizer with the weights of that step). A run is read through its
    record (`finesmith.run.load_run`): the base it started from, its tokenizer as saved
    (added tokens, chat template) and the vocabulary size it trained at, so the base is
    resized exactly as in training before the adapter goes on. `adapter` adds a PEFT
    adapter folder to a base model spec.
    """
    from finesmith.model.load import load_chat_tokenizer, resize_embeddings
    from finesmith.run import has_record, load_run
    from pathlib import Path

    folder = Path(model)
    if adapter is None and folder.is_dir() and checkpoint_run(folder) is not None:
        return _for_inference(_checkpoint_model(folder, device), device, precision), \
            load_chat_tokenizer(str(checkpoint_run(folder)))[0]
    if folder.is_dir() and has_record(folder) and adapter is None:
        run = load_run(folder)
        if run.record.kind != "run":
            raise FinesmithError(f"{model}: a staged run; pass one of its stage folders (see {model}/stages.json)")
        tokenizer, _ = load_chat_tokenizer(str(folder))
        if not run.record.adapter:
            net = load_model(str(folder), device)
        elif run.record.method_name == "qlora":
            net = qlora_base_for_merging(run.base_spec, device)
        else:
            net = load_model(run.base_spec, device)
            resize_embeddings(net, int(run.record.tokenizer.get("vocab_size") or len(tokenizer)))
            net = _put_adapter(net, str(folder))
        return _for_inference(net, device, precision), tokenizer
    if folder.is_dir() and (folder / "adapter_config.json").is_file() and adapter is None:
        raise FinesmithError(f"{model}: an adapter folder without a finesmith run record; "
                             f"pass --model BASE --adapter {model}")
    source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model
    tokenizer, _ = load_chat_tokenizer(source)
    net = load_model(model, device)
    resize_embeddings(net, len(tokenizer))
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FinesmithError(f"{adapter}: not an adapter folder (no adapter_config.json); "
                                 "pass an adapter run's output folder")
        net = _put_adapter(net, adapter)
    return _for_inference(net, device, precision), tokenizer


def checkpoint_run(folder: Any) -> Any:
    """The run folder of a checkpoint folder (`RUN/checkpoints/step-N` or `best`), else None."""
    from pathlib import Path

    from finesmith.run import has_record
    from finesmith.train.checkpoint import STATE_FILE

    folder = Path(folder)
    run = folder.parent.parent
    return run if folder.parent.name == "checkpoints" and (folder / STATE_FILE).is_file() and has_record(run) else None


def _checkpoint_model(folder: Any, device: str) -> Any:
    """The model a run had at one checkpoint: its base, resized as in training, with the
    checkpoint's adapter (saved as a plain PEFT adapter) or its trained weights (full runs)."""
    from pathlib import Path

    from finesmith.model.load import resize_embeddings
    from finesmith.run import load_run

    folder = Path(folder)
    run = load_run(checkpoint_run(folder))
    vocab = int(run.record.tokenizer.get("vocab_size") or 0)
    if run.record.adapter:
        if not (folder / "adapter_config.json").is_file():
            raise FinesmithError(f"{folder}: this checkpoint holds no adapter (a sharded run's checkpoint); "
                                 "serve the finished run instead")
        net = qlora_base_for_merging(run.base_spec, device) if run.record.method_name == "qlora" \
            else load_model(run.base_spec, device)
        if vocab:
            resize_embeddings(net, vocab)
        return _put_adapter(net, str(folder))
    net = load_model(run.base_spec, device)
    if vocab:
        resize_embeddings(net, vocab)
    _load_trained_weights(folder, net)
    return net


def _load_trained_weights(folder: Any, net: Any) -> None:
    """Copy a full run's checkpoint weights (`trainable.safetensors`, or the sharded state) into `net`."""
    from safetensors.torch import load_file

    from finesmith.train.checkpoint import SHARDED_DIR

    params = dict(net.named_parameters())
    if (folder / "trainable.safetensors").is_file():
        saved = load_file(str(folder / "trainable.safetensors"))
    else:
        import torch.distributed.checkpoint as dcp

        saved = {"model": {name: p.detach().clone() for name, p in params.items()}}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(saved, checkpoint_id=folder / SHARDED_DIR, no_dist=True,
                     planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        saved = saved["model"]
    with torch.no_grad():
        for name, value in saved.items():
            if name in params:
                params[name].copy_(value)


def _for_inference(net: Any, device: str, precision: str) -> Any:
    """Eval mode, in the dtype `precision` asks for on `device`."""
    from finesmith.core.device import inference_dtype

    dtype = inference_dtype(precision, device)
    if dtype != torch.float32:
        net = net.to(dtype)
    return net.eval()


def _put_adapter(model: Any, folder: str) -> Any:
    from peft import PeftModel

    with quiet_expert_rank_warning():
        return PeftModel.from_pretrained(model, folder)


def attach_adapter(model: Any, folder: str, name: str) -> Any:
    """Add the PEFT adapter in `folder` to `model` under `name`, unmerged, for inference: a plain
    model becomes a PeftModel around the same base (nothing copied), a PeftModel gains one more
    adapter. The adapter takes the dtype of the base layers it sits on. Returns the PeftModel."""
    from peft import PeftModel

    with quiet_expert_rank_warning():
        if not hasattr(model, "peft_config"):
            model = PeftModel.from_pretrained(model, folder, adapter_name=name, autocast_adapter_dtype=False)
        else:
            model.load_adapter(folder, adapter_name=name, autocast_adapter_dtype=False)
    return model.eval()


__all__ = ["METHODS", "Method", "apply_method", "attach_adapter", "check_method_supported", "count_parameters", "get_method",
           "load_base_model", "load_for_inference", "method_of", "resolve_model_path"]
