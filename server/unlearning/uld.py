"""ULD assistants at serving time: LoRA weights applied per row on the target's own frozen layers.

An assistant is the target's first K layers + its LoRA, then the final norm and the LM head. The
model runner stacks assistant rows under the target rows for layers < K; the forward hooks
installed here add each row's LoRA delta (rows without an assistant get none). Only the LoRA
weights are held in memory: no copy of the target's weights.

    logits = target_logits - alpha * assistant_logits, on tokens with
    log p_target >= max log p_target + ln(filter); other tokens get -inf (the paper's rule).
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unlearn_serve.artifact import ArtifactError, Manifest, check_fingerprint, load_manifest, load_weights

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Assistant:
    name: str
    adapter_id: int
    path: str
    manifest: Manifest
    num_layers: int  # K
    alpha: float
    filter: float
    # module name -> (A [r, in], B_scaled [out, r]); B already multiplied by the LoRA scale
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    nbytes: int = 0
    in_flight: int = 0
    unloading: bool = False


class LoRARowContext:
    """Which stacked-batch rows use which adapter during the current forward (set by the runner).

    Most linears see [rows, T, H]; some (MoE shared experts) see the batch flattened to tokens,
    [rows * T, H]. `token_groups` holds the same groups as token indices for those.
    """

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor]] = []  # (adapter_id, row indices)
        self.seq_len = 1
        self._token_groups: list[tuple[int, torch.Tensor]] | None = None

    def set(self, groups: list[tuple[int, torch.Tensor]], seq_len: int) -> None:
        self.groups, self.seq_len, self._token_groups = groups, seq_len, None

    def clear(self) -> None:
        self.set([], 1)

    @property
    def token_groups(self) -> list[tuple[int, torch.Tensor]]:
        """`groups` as indices into the batch flattened to [rows * seq_len] (built on first use)."""
        if self._token_groups is None:
            t = self.seq_len
            self._token_groups = [
                (adapter_id, (rows[:, None] * t + torch.arange(t, device=rows.device)).reshape(-1))
                for adapter_id, rows in self.groups
            ]
        return self._token_groups


class AssistantRegistry:
    """Loaded ULD assistants of one engine, with per-row LoRA hooks on the target's linears."""

    def __init__(self, model: torch.nn.Module, base_fingerprint: dict, model_name: str):
        self.model = model
        self.base_fingerprint = base_fingerprint
        self.model_name = model_name
        self.assistants: dict[str, Assistant] = {}
        self.rows = LoRARowContext()
        self._next_id = 0
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        # module name -> {adapter_id: (A, B_scaled)}
        self._module_adapters: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    def read(self, name: str, path: str | Path) -> Assistant:
        """Validate and read an artifact (no engine state touched; safe off the engine thread)."""
        path = Path(path)
        manifest = load_manifest(path)
        if manifest.method != "uld":
            raise ArtifactError(f"{path}: is a {manifest.method!r} artifact, not a ULD assistant")
        check_fingerprint(manifest, self.base_fingerprint, str(path), self.model_name)
        weights = load_weights(path, "uld")
        try:
            adapter_config = json.loads((path / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path}: missing or unreadable adapter_config.json ({exc})") from None
        rank = int(adapter_config.get("r", 8))
        lora_alpha = float(adapter_config.get("lora_alpha", rank))
        scale = lora_alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else lora_alpha / rank
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            m = _LORA_KEY.match(key)
            if m is None:
                raise ArtifactError(f"{path}: unexpected tensor {key!r} in adapter weights")
            parts.setdefault(m["module"], {})[m["part"]] = tensor
        param = next(self.model.parameters())
        lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        max_layer = -1
        for module_name, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise ArtifactError(f"{path}: {module_name} lacks lora_A or lora_B")
            try:
                module = self.model.get_submodule(module_name)
            except AttributeError:
                raise ArtifactError(f"{path}: adapter targets {module_name}, which the model lacks") from None
            a, b = ab["A"], ab["B"]
            if a.shape[1] != module.in_features or b.shape[0] != module.out_features or a.shape[0] != b.shape[1]:
                raise ArtifactError(f"{path}: LoRA shapes for {module_name} do not match the model")
            lora[module_name] = (
                a.to(param.device, param.dtype).contiguous(),
                (b.float() * scale).to(param.device, param.dtype).contiguous(),
            )
            layer = _LAYER_INDEX.search(f".{module_name}.")
            if layer:
                max_layer = max(max_layer, int(layer.group(1)))
        num_layers = int(manifest.details.get("assistant_layers", max_layer + 1))
        if max_layer >= num_layers:
            raise ArtifactError(f"{path}: LoRA weights on layer {max_layer} but assistant_layers={num_layers}")
        defaults = manifest.defaults
        nbytes = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in lora.values())
        return Assistant(
            name=name,
            adapter_id=-1,
            path=str(path),
            manifest=manifest,
            num_layers=num_layers,
            alpha=float(defaults.get("alpha", 0.75)),
            filter=float(defaults.get("filter", 1e-2)),
            lora=lora,
            nbytes=nbytes,
        )

    def add(self, assistant: Assistant) -> Assistant:
        """Install a read assistant (engine thread, between steps)."""
        if assistant.name in self.assistants:
            raise ArtifactError(f"an artifact named {assistant.name!r} is already loaded")
        assistant.adapter_id = self._next_id
        self._next_id += 1
        for module_name, ab in assistant.lora.items():
            self._module_adapters.setdefault(module_name, {})[assistant.adapter_id] = ab
            if module_name not in self._hooks:
                module = self.model.get_submodule(module_name)
                self._hooks[module_name] = module.register_forward_hook(self._make_hook(module_name))
        self.assistants[assistant.name] = assistant
        return assistant

    def remove(self, name: str) -> None:
        assistant = self.assistants.pop(name)
        for module_name in assistant.lora:
            adapters = self._module_adapters.get(module_name, {})
            adapters.pop(assistant.adapter_id, None)
            if not adapters:
                self._module_adapters.pop(module_name, None)
                self._hooks.pop(module_name).remove()

    def max_layers(self) -> int:
        return max((a.num_layers for a in self.assistants.values()), default=0)

    # ------------------------------------------------------------------ forward
    def _make_hook(self, module_name: str):
        def hook(module, inputs, output):
            groups = self.rows.groups
            if not groups:
                return output
            adapters = self._module_adapters.get(module_name)
            x = inputs[0]
            if x.dim() == 2:  # flattened to tokens (e.g. an MoE shared expert)
                groups = self.rows.token_groups
            for adapter_id, rows in groups:
                ab = adapters.get(adapter_id) if adapters else None
                if ab is None:
                    continue
                a, b = ab
                delta = (x.index_select(0, rows) @ a.t()) @ b.t()
                output.index_add_(0, rows, delta)
            return output

        return hook


def combine_logits(
    target_logits: torch.Tensor,
    assistant_logits: torch.Tensor,
    alpha: torch.Tensor,
    log_filter: torch.Tensor,
) -> torch.Tensor:
    """ULD's combination for [R, V] rows: target - alpha * assistant on the target's plausible set.

    Plausible (relative-top filter, DoLa/ULD): log p_target >= max log p_target + ln(filter).
    Implausible tokens get -inf, so subtracting the assistant never promotes them.
    """
    combined = target_logits.float() - alpha[:, None] * assistant_logits.float()
    return combined.masked_fill(~plausible_mask(target_logits, log_filter), float("-inf"))


def plausible_mask(target_logits: torch.Tensor, log_filter: torch.Tensor) -> torch.Tensor:
    """[R, V] bool: the relative-top filter, log p_target >= max log p_target + ln(filter)."""
    # log p - max log p == logit - max logit, so no softmax is needed
    target = target_logits.float()
    return target >= target.max(dim=-1, keepdim=True).values + log_filter[:, None]


def combine_on_candidates(
    target_logits: torch.Tensor,
    candidates: torch.Tensor,
    assistant_candidate_logits: torch.Tensor,
    alpha: torch.Tensor,
    keep: torch.Tensor,
) -> torch.Tensor:
    """`combine_logits` when the assistant was scored only on `candidates` [R, M] (a superset of `keep`).

    Everything outside the plausible set is -inf anyway, so the assistant's LM head is needed on
    the plausible tokens only: M columns instead of V (SmolLM2: tens instead of 49,152).
    """
    target = target_logits.float()
    values = target.gather(-1, candidates) - alpha[:, None] * assistant_candidate_logits.float()
    values = values.masked_fill(~keep.gather(-1, candidates), float("-inf"))
    return torch.full_like(target, float("-inf")).scatter_(-1, candidates, values)
