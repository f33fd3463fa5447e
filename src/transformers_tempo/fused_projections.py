"""One matmul for projections that read the same input: the decoder's q/k/v and gate/up.

At batch 1 a decoding step is a chain of matrix-vector products that read the weights once each,
and small ones run far below the memory bandwidth: in a profile of one decoding step on an H200 the
smallest of the decoder's seven products per layer took about 8 us, as long as reading 30 MB at the
rate of the large ones, for 5 MB of weights. One product over q/k/v (and one over gate/up) reads
the same bytes in fewer, larger kernels without changing what is computed: the fused output is the
outputs side by side, each column the same dot product. Measured on one H200 (Tempo-6B architecture,
1024 frames, graphed greedy decoding of the eager kernels, same run): 139 tokens/s fused against 125
unfused, the same greedy tokens. Graphed decoding of the compiled step: 205 tokens/s when the trace
took each projection on its own, 253 with the fused products traced (two runs, same machine kind).

The checkpoint format is kept: each projection's weight stays a parameter under its own name, now a
view into one shared buffer (no extra memory), and `state_dict`, loading and saving see the same
names and shapes. The fused product is used for eager inference, and in torch.compile traces made
inside `fused_products_in_trace` (graphed decoding's compiled step): there the trace takes one product
per group (`_FusedGroup.traced_output`). With gradients enabled, or once a weight no longer lies in
the shared buffer (after `.to()` or a replaced parameter), every projection falls back to its own
`nn.Linear.forward`.

Every group's product, and that of the decoder's other projections (o and down, groups of one,
`DECODER_SINGLE_PRODUCTS`), goes through `gemv`: at one input row, on CUDA, a Triton
matrix-vector kernel that reads the weights faster than cuBLAS (see `gemv_kernels`); otherwise
`F.linear`.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from .gemv_kernels import gemv


class _FusedGroup:
    """Linear layers called one after the other on the same input, computed by one product.

    The first member called on an input computes every member's output at once; the others take
    their slice. Pending slices are kept per thread (two threads may run the same layer at once)
    and dropped once every member has taken its own, so nothing is kept alive between calls.
    """

    def __init__(self, members: list[nn.Linear]):
        self.members = members
        self.sizes = [member.out_features for member in members]
        if len(members) == 1:  # nothing to fuse: the product reads the layer's own weight
            self.weight = members[0].weight.detach()
        else:
            self.weight = torch.cat([member.weight.detach() for member in members])
            start = 0
            for member, size in zip(members, self.sizes):
                member.weight = nn.Parameter(self.weight[start : start + size], requires_grad=member.weight.requires_grad)
                start += size
        self.parameters = [member.weight for member in members]
        self.pointers = [member.weight.data_ptr() for member in members]
        self.pending: dict[int, tuple[torch.Tensor, list]] = {}  # thread -> (input, slices not yet taken)
        self.traced: tuple[torch.Tensor, tuple] | None = None  # `traced_output`'s product while tracing
        self.enabled = True  # `set_fused_projections`
        self.stale = False  # a weight left the shared buffer: the group is off for good

    def usable(self) -> bool:
        if self.stale or not self.enabled or torch.is_grad_enabled():
            return False
        if torch.compiler.is_compiling():
            # Addresses cannot be read while tracing: only traces that `fused_products_in_trace`
            # allows, which checks them first, take the fused product. Also guarded on: the same
            # parameter objects, on the buffer's device and dtype.
            return _TRACE_FUSED and all(
                member.weight is parameter
                and parameter.device == self.weight.device
                and parameter.dtype == self.weight.dtype
                for member, parameter in zip(self.members, self.parameters)
            )
        if [member.weight.data_ptr() for member in self.members] != self.pointers:
            # Moved (`.to()`), cast or replaced: free the old buffer rather than keep a second copy.
            self.stale, self.weight, self.pending = True, None, {}
            return False
        return True

    def output(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.traced_output(index, hidden_states)
        thread = threading.get_ident()
        entry = self.pending.get(thread)
        if entry is None or entry[0] is not hidden_states or entry[1][index] is None:
            entry = (hidden_states, list(gemv(hidden_states, self.weight).split(self.sizes, dim=-1)))
            self.pending[thread] = entry
        output, entry[1][index] = entry[1][index], None
        if all(taken is None for taken in entry[1]):
            del self.pending[thread]
        return output

    def traced_output(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """`output` as torch.compile traces it: one product per input in the traced graph (inductor
        does not merge three identical products), held in `traced` only while the trace runs
        through the group's members; the last member clears it, so no tensor outlives the call."""
        if self.traced is None or self.traced[0] is not hidden_states:
            self.traced = (hidden_states, gemv(hidden_states, self.weight).split(self.sizes, dim=-1))
        output = self.traced[1][index]
        if index == len(self.sizes) - 1:
            self.traced = None
        return output


class _FusedMember:
    """What one member of a group runs: its slice of the fused product, or its own product where
    the fused one does not apply. The member's `forward` is this object's bound `forward`: an
    object, not a closure, so that `copy.deepcopy` and pickling of the model copy it along with the
    layer and its group; a bound method rather than the object itself, because torch.compile guards
    on the identity of a called object but only on the code of a called method, so compiling each
    decoder layer's MLP (`TempoModel.compile_decoder`) compiles once instead of once per layer."""

    def __init__(self, linear: nn.Linear, group: _FusedGroup, index: int):
        self.linear, self.group, self.index = linear, group, index

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.group.usable():
            return nn.Linear.forward(self.linear, hidden_states)
        return self.group.output(self.index, hidden_states)


def _fusable(members: list[nn.Module]) -> bool:
    first = members[0]
    return all(
        type(member) is nn.Linear
        and member.bias is None
        and member.in_features == first.in_features
        and member.weight.dtype == first.weight.dtype
        and member.weight.device == first.weight.device
        and member.weight.device.type != "meta"
        and _own_forward(member)
        for member in members
    )


def _own_forward(member: nn.Module) -> bool:
    """Whether the layer runs its class's forward (not wrapped by someone else, nor fused in a group
    that is still live); a stale group's forward is taken off."""
    installed = vars(member).get("forward")
    fused = fused_member(member)
    if fused is not None and fused.group.stale:
        del member.forward
        return True
    return installed is None


def fused_member(linear: nn.Module) -> _FusedMember | None:
    """The `_FusedMember` that `fuse_projections` installed on `linear`, if any."""
    member = getattr(vars(linear).get("forward"), "__self__", None)
    return member if isinstance(member, _FusedMember) else None


def fuse_projections(module: nn.Module, groups: dict[str, tuple[str, ...]]) -> int:
    """Fuse, in every submodule of `module` whose class name is a key of `groups`, the linear
    layers named by its value (e.g. ``{"Qwen3Attention": ("q_proj", "k_proj", "v_proj")}``).

    Members must be bias-free `nn.Linear` layers on the same device and dtype; other groups are left
    as they are. Returns the number of groups fused. Call it after the model reached its device and
    dtype: a later `.to()` turns the fused product off (and frees its buffer at the next call) until
    `fuse_projections` is called again.
    """
    fused = 0
    for submodule in list(module.modules()):
        names = groups.get(type(submodule).__name__)
        if not names or not all(isinstance(getattr(submodule, name, None), nn.Module) for name in names):
            continue
        members = [getattr(submodule, name) for name in names]
        if not _fusable(members):
            continue
        group = _FusedGroup(members)
        for index, member in enumerate(members):
            # An instance attribute, not a submodule: the module tree and state_dict stay unchanged.
            member.forward = _FusedMember(member, group, index).forward
        fused += 1
    return fused


def _groups(module: nn.Module) -> list[_FusedGroup]:
    """The live groups that `fuse_projections` made in `module`."""
    groups = {id(member.group): member.group for m in module.modules() if (member := fused_member(m))}
    return [group for group in groups.values() if not group.stale]


def set_fused_projections(module: nn.Module, enabled: bool = True) -> int:
    """Switch the fused product of every group that `fuse_projections` made in `module` on or off
    (off: each projection computes its own product from the same weights). Returns the number of
    groups switched."""
    groups = _groups(module)
    for group in groups:
        group.enabled = enabled
    return len(groups)


# Whether a torch.compile trace may take the fused products (`fused_products_in_trace`).
_TRACE_FUSED = False


@contextlib.contextmanager
def fused_products_in_trace(module: nn.Module):
    """Let torch.compile calls of `module` made inside this block trace the fused products.

    Outside it, traces take each projection's own product. Why only here: a trace cannot see
    where the weights live, and after `.to()` round trips, `.data` swaps or a deep copy the
    parameters no longer lie in the group's buffer while still being the same objects of the same
    device and dtype. So this block first checks every group's addresses eagerly (marking the moved
    ones stale, which frees their buffer). Graphed decoding compiles and captures its step in it;
    the compiled code is guarded on this switch, so a call outside the block traces again.
    """
    global _TRACE_FUSED
    for group in _groups(module):
        group.usable()  # eager: compares the addresses
        group.traced = None
    previous, _TRACE_FUSED = _TRACE_FUSED, True
    try:
        yield
    finally:
        _TRACE_FUSED = previous


# The decoder's projections that share an input, by the class of the module that holds them.
DECODER_GROUPS = {
    "Qwen3Attention": ("q_proj", "k_proj", "v_proj"),
    "TempoDecoderAttention": ("q_proj", "k_proj", "v_proj"),  # the same after `compile_decoder`
    "Qwen3MLP": ("gate_proj", "up_proj"),
}
# The decoder's other projections: groups of one, for the matrix-vector kernel at batch 1.
DECODER_SINGLE_PRODUCTS = {
    "Qwen3Attention": ("o_proj",),
    "TempoDecoderAttention": ("o_proj",),
    "Qwen3MLP": ("down_proj",),
}


def fuse_decoder_projections(decoder: nn.Module) -> int:
    """`fuse_projections` of the decoder's q/k/v and gate/up, and its o and down projections as
    groups of one (`enable_compiled_inference` calls it). Returns the number of groups made."""
    return fuse_projections(decoder, DECODER_GROUPS) + fuse_projections(decoder, DECODER_SINGLE_PRODUCTS)
