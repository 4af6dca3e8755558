"""ULD assistants at serving time: LoRA weights applied per row on the target's own frozen layers.

An assistant is the target's first K layers + its LoRA, then the final norm and the LM head. The
model runner stacks assistant rows under the target rows for layers < K; the forward hooks
installed here add each row's LoRA delta (rows without an assistant get none). Only the LoRA
weights are held in memory: no copy of the target's weights.

    logits = target_logits - alpha * penalty(assistant_logits), on the candidate tokens: those with
    log p_target >= max log p_target + ln(filter) (the paper's rule) and the target's top
    ULD_MIN_CANDIDATES; other tokens get -inf. The penalty is the assistant's logit (rule `difference`)
    or how far it lies above its median over the candidates (`prefer`, the default for new artifacts).
    With `refilter` (manifest defaults; new artifacts) the candidates the subtraction pushed below
    max + ln(filter) get -inf too: unlearn_serve/uld_combine.py.
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
from unlearn_serve.uld_combine import (  # noqa: F401  (the engine imports them from here)
    ULD_MIN_CANDIDATES,
    CombineOptionError,
    CombineOptions,
    CombineSettings,
    combine_logits,
    combine_on_candidates,
    plausible_mask,
)

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
    unloading: bool = False
    # rule, refilter, margin, floor: the manifest's defaults; a manifest written before one existed gets the
    # value its alpha was calibrated for (`difference`, off, 0, off)
    combine: CombineOptions = field(default_factory=CombineOptions)


# Up to this many max-rank adapters wide, every assistant row runs through all loaded adapters'
# concatenated A/B (two plain matmuls, a column mask picks each row's adapter); wider than that,
# each row gathers its own padded A/B (the BGMV/Punica layout) so the work stays one rank per row.
MASKED_MAX_ADAPTERS = 4


@dataclass
class _AdapterLayout:
    """Where each loaded adapter lives in the stacked A/B of every hooked module (rebuilt on load/unload)."""

    slots: dict[int, int]  # adapter_id -> slot (0..S-1)
    columns: list[tuple[int, int]]  # slot -> [start, end) of its rank columns in the concatenated stack
    col_slot: torch.Tensor  # [W] long: the slot owning each column
    max_rank: int
    version: int

    @property
    def width(self) -> int:
        return self.columns[-1][1] if self.columns else 0


@dataclass
class _ModuleStack:
    """One module's LoRA weights for all loaded adapters, concatenated along the rank."""

    a: torch.Tensor  # [W, in]; zero rows where an adapter does not target this module
    b: torch.Tensor  # [out, W]; B already multiplied by the LoRA scale
    padded: tuple[torch.Tensor, torch.Tensor] | None = None  # ([S, r_max, in], [S, out, r_max]), built on use


@dataclass
class _RowPlan:
    """The assistant rows of one batch composition and the adapter of each (cached across decode steps)."""

    rows: torch.Tensor  # [n] stacked-batch row indices
    slots: torch.Tensor | None  # [n] adapter slot per row (read by the per-row gather only; None in `fixed_plan`)
    mask: torch.Tensor | None  # [n, W] 0/1 column mask; None when one adapter's columns suffice
    columns: tuple[int, int] | None  # that one adapter's columns
    gather: bool  # per-row padded A/B (many adapters) instead of the masked concatenation
    seq_len: int
    # [start, end): the rows are exactly this contiguous range (a CUDA-graphed step): a slice, no gather or scatter
    span: tuple[int, int] | None = None
    _tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    # (input, its gathered rows): q/k/v (and gate/up) get the same input tensor, gathered once
    last_input: tuple[torch.Tensor, torch.Tensor] | None = None

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(rows, slots, mask) for linears that see the batch flattened to [rows * T, H] (MoE shared experts)."""
        if self._tokens is None:
            t = self.seq_len
            rows = (self.rows[:, None] * t + torch.arange(t, device=self.rows.device)).reshape(-1)
            mask = None if self.mask is None else self.mask.repeat_interleave(t, dim=0)
            self._tokens = (rows, None if self.slots is None else self.slots.repeat_interleave(t), mask)
        return self._tokens


def fixed_plan(start: int, n: int, mask: torch.Tensor | None, device: torch.device) -> _RowPlan:
    """A plan for the decode rows [start, start + n) of the stacked batch, one per assistant row, over tensors that
    outlive it (a CUDA graph reads them at replay): `mask` [n, W] 0/1 columns of each row's adapter (all zero: a
    padding row). `mask` None: one adapter is loaded, every row takes its columns (padding rows too: their outputs
    are dropped and their K/V goes to their own free slots). Never the per-row gather, so no slot ids."""
    rows = torch.arange(start, start + n, device=device)
    return _RowPlan(rows, None, mask, None, False, 1, span=(start, start + n))  # no columns, no mask: every column


def adapter_columns_mask(layout: _AdapterLayout, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, W] 0/1: the rank columns of each row's adapter slot (slot -1: none)."""
    return (layout.col_slot[None, :] == slots[:, None]).to(dtype)


class LoRARowContext:
    """Which stacked-batch rows use which adapter during the current forward (set by the runner).

    `set` takes groups (adapter_id, row indices); the hooks use them as one plan: all assistant
    rows in one index, with a per-row adapter slot. The plan is cached while the runner passes the
    same groups object (the engine does for every decode step of one running set), so a step
    costs no regrouping; building one is tensor work only (no host sync).
    """

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor]] = []  # (adapter_id, row indices)
        self.seq_len = 1
        self.layout: _AdapterLayout | None = None  # set by the registry
        self._plan: _RowPlan | None = None
        self._plan_key: tuple | None = None
        self._fixed: _RowPlan | None = None

    def set(self, groups: list[tuple[int, torch.Tensor]], seq_len: int, plan: _RowPlan | None = None) -> None:
        """`plan`: a fixed plan over persistent tensors (a CUDA-graphed step: `fixed_plan`), used instead of one
        built from `groups`."""
        self.groups, self.seq_len = groups, seq_len
        if self._plan is not None:
            self._plan.last_input = None  # hold no activation between forwards
        self._fixed = plan
        if plan is not None:
            plan.last_input = None

    def clear(self) -> None:
        self.set([], 1)

    def plan(self, dtype: torch.dtype) -> _RowPlan | None:
        """The current forward's plan, or None when no row uses an adapter."""
        if self._fixed is not None:
            return self._fixed
        groups, layout = self.groups, self.layout
        if not groups or layout is None:
            return None
        # the groups object itself is held in the key, so its id cannot be reused while cached
        key = (groups, self.seq_len, layout.version, dtype)
        cached = self._plan_key
        if cached is not None and cached[0] is groups and cached[1:] == key[1:]:
            return self._plan
        rows = torch.cat([r for _, r in groups]) if len(groups) > 1 else groups[0][1]
        slot_ids = [layout.slots[adapter_id] for adapter_id, _ in groups]
        slots = torch.cat([torch.full_like(r, slot) for slot, (_, r) in zip(slot_ids, groups, strict=True)])
        gather = layout.width > MASKED_MAX_ADAPTERS * layout.max_rank
        mask, columns = None, None
        if len(groups) == 1:
            columns = layout.columns[slot_ids[0]]  # one adapter in the batch: slice its columns, no mask
        elif not gather:
            mask = adapter_columns_mask(layout, slots, dtype)
        self._plan = _RowPlan(rows, slots, mask, columns, gather and len(groups) > 1, self.seq_len)
        self._plan_key = key
        return self._plan


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
        self._stacks: dict[str, _ModuleStack] = {}  # module name -> all adapters' A/B, stacked
        self._layout_version = 0
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
        try:
            combine = CombineOptions().updated(defaults)
        except CombineOptionError as exc:
            raise ArtifactError(f"{path}: defaults.{exc.key} {exc}") from None
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
            combine=combine,
        )

    def add(self, assistant: Assistant) -> Assistant:
        """Install a read assistant (engine thread, between steps)."""
        if assistant.name in self.assistants:
            raise ArtifactError(f"an artifact named {assistant.name!r} is already loaded")
        assistant.adapter_id = self._next_id
        self._next_id += 1
        self.assistants[assistant.name] = assistant
        self._restack()
        return assistant

    def remove(self, name: str) -> None:
        self.assistants.pop(name)
        self._restack()

    def _restack(self) -> None:
        """Concatenate every loaded adapter's A/B per module (on load/unload, never per step).

        Each adapter owns the same rank columns in every module (zeros where it skips a module),
        so one per-row column mask serves all modules. The assistants' `lora` entries become views
        into the stacks: the weights are held once.
        """
        assistants = list(self.assistants.values())
        widths = [max((a.shape[0] for a, _ in x.lora.values()), default=0) for x in assistants]
        columns, start = [], 0
        for width in widths:
            columns.append((start, start + width))
            start += width
        param = next(self.model.parameters())
        stacks: dict[str, _ModuleStack] = {}
        for module_name in {m for x in assistants for m in x.lora}:
            module = self.model.get_submodule(module_name)
            weights = [x.lora.get(module_name) for x in assistants]
            dtype = next(w[0].dtype for w in weights if w is not None)
            a = torch.zeros(start, module.in_features, dtype=dtype, device=param.device)
            b = torch.zeros(module.out_features, start, dtype=dtype, device=param.device)
            for (c0, _), ab in zip(columns, weights, strict=True):
                if ab is not None:
                    a[c0 : c0 + ab[0].shape[0]] = ab[0]
                    b[:, c0 : c0 + ab[1].shape[1]] = ab[1]
            stacks[module_name] = _ModuleStack(a, b)
        for x, (c0, _) in zip(assistants, columns, strict=True):
            for module_name, (a, b) in x.lora.items():
                stack = stacks[module_name]
                x.lora[module_name] = (stack.a[c0 : c0 + a.shape[0]], stack.b[:, c0 : c0 + b.shape[1]])
        for module_name in list(self._hooks):
            if module_name not in stacks:
                self._hooks.pop(module_name).remove()
        for module_name in stacks:
            if module_name not in self._hooks:
                module = self.model.get_submodule(module_name)
                self._hooks[module_name] = module.register_forward_hook(self._make_hook(module_name))
        self._stacks = stacks
        self._layout_version += 1
        col_slot = [slot for slot, (c0, c1) in enumerate(columns) for _ in range(c1 - c0)]
        self.rows.layout = _AdapterLayout(
            slots={x.adapter_id: slot for slot, x in enumerate(assistants)},
            columns=columns,
            col_slot=torch.tensor(col_slot, dtype=torch.long, device=param.device),
            max_rank=max(widths, default=0),
            version=self._layout_version,
        )

    def max_layers(self) -> int:
        return max((a.num_layers for a in self.assistants.values()), default=0)

    # ------------------------------------------------------------------ forward
    def _make_hook(self, module_name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            plan = self.rows.plan(x.dtype)
            if plan is None:
                return output
            rows, delta = self.delta(module_name, x, plan)
            if plan.span is not None and x.dim() == 3:  # contiguous rows: add into the slice
                output[plan.span[0] : plan.span[1]] += delta
            else:
                output.index_add_(0, rows, delta)
            return output

        return hook

    def delta(self, module_name: str, x: torch.Tensor, plan: _RowPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, LoRA delta of those rows) for one module: one gather of the rows, two matmuls."""
        stack = self._stacks[module_name]
        if x.dim() == 2:  # flattened to tokens (e.g. an MoE shared expert)
            rows, slots, mask = plan.tokens()
        else:
            rows, slots, mask = plan.rows, plan.slots, plan.mask
        if plan.last_input is not None and plan.last_input[0] is x:
            xa = plan.last_input[1]
        else:
            xa = x[plan.span[0] : plan.span[1]] if plan.span is not None and x.dim() == 3 else x.index_select(0, rows)
            plan.last_input = (x, xa)
        if plan.gather:
            a_pad, b_pad = self._padded(stack)
            x3 = xa if xa.dim() == 3 else xa[:, None, :]
            h = torch.bmm(x3, a_pad.index_select(0, slots).transpose(1, 2))  # [n, T, r_max]
            delta = torch.bmm(h, b_pad.index_select(0, slots).transpose(1, 2))  # [n, T, out]
            return rows, delta.reshape(xa.shape[:-1] + delta.shape[-1:])
        a, b = stack.a, stack.b
        if plan.columns is not None:
            a, b = a[plan.columns[0] : plan.columns[1]], b[:, plan.columns[0] : plan.columns[1]]
        h = xa @ a.t()
        if mask is not None:
            h = h * (mask if h.dim() == 2 else mask[:, None, :])
        return rows, h @ b.t()

    def _padded(self, stack: _ModuleStack) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, r_max, in] and [S, out, r_max]: each adapter's columns, zero-padded to the largest rank."""
        if stack.padded is None:
            layout = self.rows.layout
            r = layout.max_rank
            a_pad = stack.a.new_zeros(len(layout.columns), r, stack.a.shape[1])
            b_pad = stack.b.new_zeros(len(layout.columns), stack.b.shape[0], r)
            for slot, (c0, c1) in enumerate(layout.columns):
                a_pad[slot, : c1 - c0] = stack.a[c0:c1]
                b_pad[slot, :, : c1 - c0] = stack.b[:, c0:c1]
            stack.padded = (a_pad, b_pad)
        return stack.padded
