"""UOE serving: many expert patches on one base MoE model, chosen per batch row, in one forward pass.

How it works (no engine needed, the base weights are never written):
  * Each patched MoE layer gets two forward hooks: one on its router, one on its experts module.
  * The router hook re-routes only the tokens of rows that use a patch of that layer, with the patch's
    router weights (a shadow copy of the router module, so the family's own top-k/normalisation code runs).
    A selection of the unlearned expert is kept in place with weight 0 (the base expert costs what it
    would cost unpatched) and is remembered as a selection of the patch's extra expert slot.
  * The experts hook adds the patched expert's output for exactly those (token, weight) pairs: it runs
    on every token of the patch's rows, weight 0 where the expert was not selected (a static shape).
  So the extra work per forward is: the router matmul for patched rows, and one expert's MLP on the
  tokens of patched rows. Rows without a patch (-1) get the base routing and weights
  (equal to the base model up to the float rounding of batching).

MoE blocks flatten hidden states [B, T, H] to [B*T, H] row-major, so token n of a forward belongs to row
n // T. The ids given to `rows(...)` may also be per token (length B*T) for packed layouts: ids of length L
are repeated N // L times for a forward over N tokens.

Not thread-safe: one forward at a time per model (the row assignment is state on the patch set).
The hooks index with tensors of a static size per row assignment (the patch's rows' tokens) and never
read the device; the row grouping is host work done once per assignment (`set_rows`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from unlearn_serve.artifact import ArtifactError, Manifest
from unlearn_serve.expert_patch import load_expert_patch
from unlearn_serve.families import ExpertSlices, MoEFamily, PreparedExpert, get_family

NO_PATCH = -1

RowSpec = torch.Tensor | Sequence[int | str | None]


@dataclass
class LoadedExpertPatch:
    patch_id: int
    name: str
    artifact_dir: str
    layer: int
    expert: int
    slices: ExpertSlices  # on the model's device/dtype
    prepared: PreparedExpert  # the same, laid out for two matmuls (families.prepare_expert)
    shadow_router: nn.Module  # the layer's router module with the patch's weights swapped in
    manifest: Manifest


@dataclass
class _LayerState:
    block: nn.Module
    handles: list[torch.utils.hooks.RemovableHandle]
    patches: dict[int, LoadedExpertPatch] = field(default_factory=dict)  # patch_id -> patch
    # set by the router hook, consumed by the experts hook of the same forward:
    pending: list[tuple[LoadedExpertPatch, torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _shadow_router(router: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """A shallow copy of `router` sharing its buffers and code but holding the patch's parameters."""
    shadow = copy.copy(router)
    shadow._parameters = dict(router._parameters)
    for key, value in params.items():
        shadow._parameters[key] = nn.Parameter(value, requires_grad=False)
    shadow._forward_hooks = type(router._forward_hooks)()  # never re-enter our own hook
    shadow._forward_pre_hooks = type(router._forward_pre_hooks)()
    return shadow


class ExpertPatchSet:
    """The UOE expert patches loaded on one base model, and which batch rows use which patch."""

    def __init__(
        self, model: nn.Module, model_name: str = "the loaded model", base_fingerprint: dict | None = None
    ) -> None:
        self.model = model
        self.model_name = model_name
        # The engine fingerprints the base once, before any hook exists; reuse it rather than re-probe.
        self.base_fingerprint = base_fingerprint
        self.family: MoEFamily = get_family(model)
        self._blocks = self.family.moe_layers(model)
        self._by_name: dict[str, LoadedExpertPatch] = {}
        self._by_id: dict[int, LoadedExpertPatch] = {}
        self._layers: dict[int, _LayerState] = {}
        self._next_id = 0
        self._row_ids: torch.Tensor | None = None  # [L] on CPU, None = no patches in use
        self._layer_groups: dict[int, list[tuple[LoadedExpertPatch, torch.Tensor]]] = {}
        self._token_index: dict[tuple[int, int], torch.Tensor] = {}  # (patch id, tokens per row) -> tokens
        # The engine passes the same row-id tensor for every decode step of one running set: remember the
        # grouping of the last few tensors so that a step costs no re-grouping (and no device->host copy).
        self._cache: list[tuple] = []  # (spec tensor, row ids, layer groups, token index), newest last

    # ------------------------------------------------------------------ registry

    def add(self, name: str, artifact_dir: str | Path) -> int:
        """Load and validate a UOE artifact; returns its patch id (for `rows`). ArtifactError if it does not fit."""
        return self.install(self.read(name, artifact_dir))

    def read(self, name: str, artifact_dir: str | Path) -> LoadedExpertPatch:
        """Read, validate and prepare a patch without touching the set (safe while another thread serves)."""
        if name in self._by_name:
            raise ArtifactError(f"an expert patch named {name!r} is already loaded; remove it first")
        patch, manifest = load_expert_patch(artifact_dir, self.model, self.model_name, self.base_fingerprint)
        block = self._blocks[patch.layer]
        router = self.family.router(block)
        device, dtype = router.weight.device, self.family.experts(block).gate_up_proj.dtype
        router_params = {
            key: patch.router[key].to(device=device, dtype=param.dtype)
            for key, param in self.family.router_params(block).items()
        }
        slices = patch.slices.to(device, dtype)
        return LoadedExpertPatch(
            patch_id=NO_PATCH,  # given by `install`
            name=name,
            artifact_dir=str(artifact_dir),
            layer=patch.layer,
            expert=patch.expert,
            slices=slices,
            prepared=self.family.prepare_expert(slices),
            shadow_router=_shadow_router(router, router_params),
            manifest=manifest,
        )

    def install(self, loaded: LoadedExpertPatch) -> int:
        """Make a patch from `read` selectable (between forwards: it may install hooks)."""
        if loaded.name in self._by_name:
            raise ArtifactError(f"an expert patch named {loaded.name!r} is already loaded; remove it first")
        loaded.patch_id = self._next_id
        self._next_id += 1
        state = self._layers.get(loaded.layer) or self._install_hooks(loaded.layer)
        state.patches[loaded.patch_id] = loaded
        self._by_name[loaded.name] = loaded
        self._by_id[loaded.patch_id] = loaded
        return loaded.patch_id

    def remove(self, name: str) -> None:
        loaded = self._by_name.pop(name, None)
        if loaded is None:
            raise KeyError(f"no expert patch named {name!r} is loaded")
        del self._by_id[loaded.patch_id]
        state = self._layers[loaded.layer]
        del state.patches[loaded.patch_id]
        if not state.patches:
            for handle in state.handles:
                handle.remove()
            del self._layers[loaded.layer]
        self._cache = []
        if self._row_ids is not None and bool((self._row_ids == loaded.patch_id).any()):
            self.clear_rows()  # rows pointing at a removed patch must not silently fall back

    def names(self) -> list[str]:
        return list(self._by_name)

    def patch_id(self, name: str) -> int:
        if name not in self._by_name:
            raise KeyError(f"no expert patch named {name!r} is loaded")
        return self._by_name[name].patch_id

    def lookup(self, name: str) -> int | None:
        """The patch id of `name`, or None when no patch of that name is loaded."""
        loaded = self._by_name.get(name)
        return None if loaded is None else loaded.patch_id

    def get(self, name: str) -> LoadedExpertPatch:
        return self._by_name[name]

    def describe(self, name: str) -> dict[str, object]:
        """What /v1/models shows for a loaded patch."""
        loaded = self._by_name[name]
        return {
            "family": self.model.config.model_type,
            "layer": loaded.layer,
            "expert": loaded.expert,
            "path": loaded.artifact_dir,
            "patch_parameters": sum(t.numel() for t in loaded.slices.tensors().values())
            + sum(p.numel() for p in loaded.shadow_router._parameters.values() if p is not None),
        }

    def close(self) -> None:
        """Remove all hooks; the model is the plain base model again."""
        for name in list(self._by_name):
            self.remove(name)
        self.clear_rows()

    # ------------------------------------------------------------------ row assignment

    def set_rows(self, row_patch_ids: RowSpec | None, host_ids: Sequence[int] | None = None) -> None:
        """Say which patch each batch row (or token) of the next forward(s) uses: a LongTensor [B] or a list
        of patch ids, names, or None; -1/None = no patch. `None` as a whole = no row uses a patch.

        The grouping (which rows use which patch) is host work, done once per row assignment: a list costs no
        device read; a tensor is read back once and then remembered by identity, so the engine's decode steps,
        which pass the same tensor, cost nothing here and the hooks themselves never read the device.
        `host_ids`: the same ids as a host list, when the caller has them (a device tensor is then not read).
        """
        if row_patch_ids is None:
            self._row_ids, self._layer_groups, self._token_index = None, {}, {}
            return
        for entry in self._cache:
            if entry[0] is row_patch_ids:
                self._row_ids, self._layer_groups, self._token_index = entry[1:]
                return
        if host_ids is not None:
            id_list = [int(i) for i in host_ids]
        elif isinstance(row_patch_ids, torch.Tensor):
            id_list = row_patch_ids.detach().reshape(-1).to("cpu", torch.long).tolist()
        else:
            id_list = [self._resolve(x) for x in row_patch_ids]
        ids = torch.tensor(id_list, dtype=torch.long)
        units_of: dict[int, list[int]] = {}
        for unit, pid in enumerate(id_list):
            if pid != NO_PATCH:
                units_of.setdefault(pid, []).append(unit)
        unknown = sorted(set(units_of) - set(self._by_id))
        if unknown:
            raise ValueError(f"unknown expert patch id(s) {unknown}; loaded: {sorted(self._by_id)}")
        groups: dict[int, list[tuple[LoadedExpertPatch, torch.Tensor]]] = {}
        for pid in sorted(units_of):
            loaded = self._by_id[pid]
            units = torch.tensor(units_of[pid], dtype=torch.long, device=loaded.slices.gate.device)
            groups.setdefault(loaded.layer, []).append((loaded, units))
        self._row_ids = ids if units_of else None
        self._layer_groups = groups
        self._token_index = {}  # filled by the router hook, shared with the cache entry
        if isinstance(row_patch_ids, torch.Tensor):
            # the entry holds the tensor itself, so its id cannot be reused while remembered
            self._cache = [*self._cache[-3:], (row_patch_ids, self._row_ids, groups, self._token_index)]

    def clear_rows(self) -> None:
        """No row uses a patch, and forget the cached grouping (after a patch was removed)."""
        self._row_ids, self._layer_groups, self._token_index = None, {}, {}
        self._cache = []

    @contextlib.contextmanager
    def rows(self, row_patch_ids: RowSpec | None) -> Iterator[ExpertPatchSet]:
        """`with patch_set.rows(ids): model(...)` -- ids as in `set_rows`; restores the previous rows after."""
        previous = (self._row_ids, self._layer_groups, self._token_index)
        self.set_rows(row_patch_ids)
        try:
            yield self
        finally:
            self._row_ids, self._layer_groups, self._token_index = previous

    def _resolve(self, item: int | str | None) -> int:
        if item is None:
            return NO_PATCH
        if isinstance(item, str):
            return self.patch_id(item)
        return int(item)

    # ------------------------------------------------------------------ hooks

    def _install_hooks(self, layer: int) -> _LayerState:
        block = self._blocks[layer]
        state = _LayerState(block=block, handles=[])
        router, experts = self.family.router(block), self.family.experts(block)
        state.handles.append(
            router.register_forward_hook(
                lambda m, a, k, o: self._route_patched_tokens(layer, state, a, k, o), with_kwargs=True
            )
        )
        state.handles.append(
            experts.register_forward_hook(
                lambda m, a, k, o: self._add_patched_experts(m, state, a, k, o), with_kwargs=True
            )
        )
        self._layers[layer] = state
        return state

    def _route_patched_tokens(self, layer: int, state: _LayerState, args, kwargs, output):
        state.pending = []
        groups = self._layer_groups.get(layer)
        if not groups:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        x = hidden.reshape(-1, hidden.shape[-1])
        num_tokens, num_units = x.shape[0], self._row_ids.numel()
        if num_tokens % num_units:
            raise ValueError(
                f"expert patch rows: {num_units} row ids do not divide the {num_tokens} tokens of this forward"
            )
        per_unit = num_tokens // num_units
        logits, weights, indices = output[:3]
        if torch.is_grad_enabled():  # autograd may need the originals; serving (inference mode) edits in place
            logits, weights, indices = logits.clone(), weights.clone(), indices.clone()
        for loaded, units in groups:
            tokens = self._token_index.get((loaded.patch_id, per_unit))
            if tokens is None:  # flattened token positions of this patch's rows (same in every layer)
                tokens = (units[:, None] * per_unit + torch.arange(per_unit, device=x.device)).reshape(-1)
                self._token_index[(loaded.patch_id, per_unit)] = tokens
            every_token = tokens.numel() == num_tokens  # one patch for the whole batch: no gather/scatter
            p_logits, p_weights, p_indices = loaded.shadow_router.forward(x if every_token else x[tokens])[:3]
            hit = p_indices == loaded.expert  # [n, k]; an expert is selected at most once per token
            slot_weight = (p_weights * hit).sum(dim=-1)
            # Keep the base expert's slot with weight 0: same cost as unpatched, contributes exactly 0.
            p_weights = p_weights.masked_fill(hit, 0)
            if every_token:
                logits, weights, indices = p_logits, p_weights.to(weights.dtype), p_indices.to(indices.dtype)
            else:
                logits[tokens] = p_logits.to(logits.dtype)
                weights[tokens] = p_weights.to(weights.dtype)
                indices[tokens] = p_indices.to(indices.dtype)
            # every token of the patch's rows goes on, with weight 0 where the patched expert was not selected:
            # a static shape (no boolean compaction, which would read the device), one expert on a few more tokens
            state.pending.append((loaded, tokens, every_token, slot_weight))
        return (logits, weights, indices, *output[3:])

    def _add_patched_experts(self, experts: nn.Module, state: _LayerState, args, kwargs, output):
        if not state.pending:
            return None
        pending, state.pending = state.pending, []
        hidden = args[0] if args else kwargs["hidden_states"]
        in_place = not torch.is_grad_enabled()  # serving: no autograd graph to protect, skip the copies
        for loaded, tokens, every_token, slot_weight in pending:
            x = hidden if every_token else hidden[tokens]
            expert_out = self.family.expert_forward(experts, x, loaded.slices, loaded.prepared)
            expert_out = expert_out * slot_weight[:, None].to(expert_out.dtype)
            if in_place:
                output.index_add_(0, tokens, expert_out.to(output.dtype))
            else:
                output = output.index_add(0, tokens, expert_out.to(output.dtype))
        return output


__all__ = ["NO_PATCH", "ArtifactError", "ExpertPatchSet", "LoadedExpertPatch"]
