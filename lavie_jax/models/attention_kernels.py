"""Attention kernels and the one place that picks one per call site: `choose_attention_impl`.

`model.attention_impl` (config) names a policy; each attention call site resolves it at trace time, from the
platform and the site's static shapes and dtype, to a kernel (`KERNELS`):
- 'xla': plain XLA ops (`xla_attention`: jax.nn.dot_product_attention's XLA math, heads next to the batch), logits
  and softmax materialised in float32;
- 'cudnn': cuDNN flash attention, forward and backward;
- 'cudnn_xla_grad': cuDNN flash attention forward-only; differentiated, the XLA kernel (shapes whose cuDNN
  backward is not known to work);
- 'pallas': Pallas splash attention (TPU), sequence and head dims zero-padded to lane multiples, under
  `jax.shard_map` over the batch (and head) mesh axes when a mesh is set.

Policies: 'auto' (default) picks a flash kernel where it exists and pays off, XLA elsewhere; 'xla' (or None) is XLA
everywhere; 'cudnn' is cuDNN at every site (an error where cuDNN cannot run it); 'pallas' is splash attention at the
spatial and text sites and XLA for temporal attention (its learned bias is not something splash takes).
Arrays are `q [N, T, h, d]`, `k, v [N, S, h, d]`, bias broadcastable to `[N, h, T, S]`, output `[N, T, h, d]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lavie_jax import parallel

POLICIES = ("auto", "xla", "cudnn", "pallas")  # config values of model.attention_impl (None means 'xla')
KERNELS = ("xla", "cudnn", "cudnn_xla_grad", "pallas")
MIN_CUDNN_LEN = 64  # 'auto' on GPU: shorter sequences stay XLA (little to gain from flash; a guess, not timed)
LANES = 128  # TPU lane width: splash blocks (and our padded sequence / head dims) are multiples of it
MAX_PAD_OVERHEAD = 1.25  # 'auto' on TPU: splash only if padding to LANES grows the logits by at most this factor
CUDNN_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


@functools.cache
def splash_module():
    """jax's Pallas splash attention module, or None where this jax has none (or another API): imported on first use
    (0.2 s), guarded because jax.experimental modules move between releases."""
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention as splash
    except ImportError:  # pragma: no cover - depends on the installed jax
        return None
    needed = ("make_splash_mha", "BlockSizes", "MultiHeadMask", "FullMask", "SegmentIds")
    return splash if all(hasattr(splash, name) for name in needed) else None


class AttentionImplError(ValueError):
    """A `model.attention_impl` that cannot apply here (unknown name, wrong platform, unsupported case)."""


def normalize_policy(policy: str | None) -> str:
    """'auto' | 'xla' | 'cudnn' | 'pallas' from a config value (None and 'none' mean 'xla'); unknown -> error."""
    name = "xla" if policy is None else str(policy).strip().lower()
    name = "xla" if name == "none" else name
    if name not in POLICIES:
        raise AttentionImplError(f"attention_impl={policy!r}: choose one of {POLICIES} (None = 'xla')")
    return name


@functools.cache
def local_platform() -> tuple[str, tuple[int, int] | None]:
    """('cpu' | 'cuda' | 'rocm' | 'tpu' | other, CUDA compute capability or None) of this process's devices."""
    dev = jax.devices()[0]
    backend = jax.default_backend()
    if backend != "gpu":
        return backend, None
    version = str(getattr(getattr(dev, "client", None), "platform_version", "")).lower()
    if "rocm" in version:
        return "rocm", None
    cc = getattr(dev, "compute_capability", None)
    return "cuda", (tuple(int(x) for x in str(cc).split(".")[:2]) if cc else None)


def _platform_refusal(policy: str, platform: str, pallas_available: bool) -> str | None:
    if policy == "cudnn" and platform != "cuda":
        return (f"attention_impl='cudnn' needs an NVIDIA GPU and this process runs on {platform}; use 'auto' "
                "(cuDNN where it applies on GPUs) or 'xla'")
    if policy == "pallas" and platform != "tpu":
        return (f"attention_impl='pallas' (splash attention) needs a TPU and this process runs on {platform}; use "
                "'auto' (splash where it applies on TPUs) or 'xla'")
    if policy == "pallas" and not pallas_available:
        return ("attention_impl='pallas': this jax has no jax.experimental.pallas.ops.tpu.splash_attention; use "
                "'auto' or 'xla'")
    return None


def check_attention_impl(policy: str | None, platform: str | None = None) -> str:
    """The normalised policy, or `AttentionImplError` saying why it cannot run on `platform` (default: here).
    Called when a model is built and when a command line is checked, so a wrong choice fails before any trace."""
    name = normalize_policy(policy)
    if name in ("cudnn", "pallas"):  # only these ask for the devices (before jax.distributed is set up, nothing may)
        platform = platform or local_platform()[0]
        if (why := _platform_refusal(name, platform, name != "pallas" or splash_module() is not None)) is not None:
            raise AttentionImplError(why)
    return name


def _cudnn_refusal(dtype, head_dim: int, capability: tuple[int, int] | None) -> str | None:
    """Why cuDNN flash attention cannot run this case (jax's own checks, fused_attention_stablehlo), else None."""
    if np.dtype(dtype) not in CUDNN_DTYPES:
        return f"it takes bfloat16/float16 inputs, not {np.dtype(dtype).name} (set model.dtype='bfloat16')"
    if capability is not None and capability < (8, 0):
        return f"it needs compute capability >= 8.0, this GPU has {capability[0]}.{capability[1]}"
    max_dim = 256 if capability is not None and capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_dim:
        return f"the head dim must be a multiple of 8 and <= {max_dim} on this GPU, got {head_dim}"
    return None


def _cudnn_kernel(q_len: int, kv_len: int) -> str:
    # jax refuses a biased cuDNN backward over odd lengths, and text cross-attention (77 keys) failed to train
    # with cuDNN on an H200: differentiate odd lengths with XLA instead (the forward still runs on cuDNN)
    return "cudnn" if q_len % 2 == 0 and kv_len % 2 == 0 else "cudnn_xla_grad"


def _padded(n: int) -> int:
    return -(-n // LANES) * LANES


def choose_attention_impl(policy: str | None, *, platform: str, dtype, q_len: int, kv_len: int, head_dim: int,
                          has_bias: bool = False, temporal: bool = False,
                          capability: tuple[int, int] | None = None, pallas_available: bool = True) -> str:
    """The kernel (`KERNELS`) one attention call site runs under `policy` (module docstring).

    `platform`: 'cpu' | 'cuda' | 'rocm' | 'tpu'; `capability`: the CUDA compute capability (None: unknown, taken
    as pre-Hopper); `temporal`: attention across frames (16-61 keys: plain XLA is right there). Raises
    `AttentionImplError` where an explicit policy cannot run this site.
    """
    name = normalize_policy(policy)
    if name == "xla":
        return "xla"
    site = (f"{'temporal' if temporal else 'spatial/text'} attention with {q_len} queries, {kv_len} keys, head dim "
            f"{head_dim}, {np.dtype(dtype).name}{', bias' if has_bias else ''}")
    if (why := _platform_refusal(name, platform, pallas_available)) is not None:
        raise AttentionImplError(why)
    if name == "cudnn":
        if (why := _cudnn_refusal(dtype, head_dim, capability)) is not None:
            raise AttentionImplError(f"attention_impl='cudnn' cannot run {site}: {why}; use 'auto' or 'xla'")
        return _cudnn_kernel(q_len, kv_len)
    if name == "pallas":
        if temporal:
            return "xla"
        if has_bias:
            raise AttentionImplError(f"attention_impl='pallas' cannot run {site}: splash attention takes no "
                                     "additive bias; use 'auto' or 'xla'")
        return "pallas"
    # 'auto'
    if temporal:
        return "xla"
    if platform == "cuda":
        if min(q_len, kv_len) < MIN_CUDNN_LEN or _cudnn_refusal(dtype, head_dim, capability) is not None:
            return "xla"
        return _cudnn_kernel(q_len, kv_len)
    if platform == "tpu" and pallas_available and not has_bias and head_dim <= 2 * LANES:
        overhead = _padded(q_len) * _padded(kv_len) / (q_len * kv_len)
        return "pallas" if overhead <= MAX_PAD_OVERHEAD else "xla"
    return "xla"


# --- kernels -------------------------------------------------------------------------------------------------


def xla_attention(q, k, v, bias, scale: float) -> jax.Array:
    """Softmax attention in plain XLA ops, with what `jax.nn.dot_product_attention(implementation='xla')` computes:
    float32 logits (scaled, plus `bias`), a float32 softmax cast to v's dtype, then the weighted sum of v. The heads
    are moved next to the batch first, so both matmuls are batched over leading dimensions: XLA:CPU runs them about
    twice as fast as jax's own head-in-the-middle einsums (measured: 0.43 vs 0.70 s for one 8-frame, 1024-token,
    8-head spatial attention of the base UNet; torch's bmm takes 0.42 s)."""
    qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, N, T|S, H]
    logits = jnp.einsum("bnth,bnsh->bnts", qh, kh, preferred_element_type=jnp.float32) * jnp.float32(scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bnts,bnsh->bnth", probs, vh), 1, 2)


def cudnn_attention(q, k, v, bias, scale: float) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="cudnn")


def forward_with_xla_gradient(forward, q, k, v, bias, scale: float) -> jax.Array:
    """`forward(q, k, v, bias, scale)` in a forward-only pass (sampling); under differentiation the XLA kernel,
    forward and backward (so training costs what the XLA path costs, and runs wherever XLA does)."""

    @jax.custom_vjp
    def attend(q, k, v, bias):
        return forward(q, k, v, bias, scale)

    def attend_fwd(q, k, v, bias):
        return jax.vjp(lambda *a: xla_attention(*a, scale), q, k, v, bias)  # (output, vjp function as residuals)

    def attend_bwd(vjp_fn, g):
        return vjp_fn(g)

    attend.defvjp(attend_fwd, attend_bwd)
    return attend(q, k, v, bias)


def _block(n: int) -> int:
    """The largest of 512, 256, 128 dividing `n` (a multiple of LANES): bigger tiles amortise the per-step cost."""
    return next(b for b in (512, 256, LANES) if n % b == 0)


@functools.cache
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    """The splash kernel for padded lengths (multiples of LANES), cached: building it processes the mask."""
    bq, bkv = _block(q_len), _block(kv_len)
    splash = splash_module()
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len))] * heads)
    with jax.ensure_compile_time_eval():  # its mask tables are constants: concrete arrays, not this trace's tracers
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, scale: float, *, interpret: bool = False, kernel=None) -> jax.Array:
    """Splash attention on one device's arrays `[N, T, h, d]` (no bias). Sequences are zero-padded to multiples of
    LANES with the padded keys masked out by segment ids, head dims zero-padded (exact: zeros add nothing to q.k
    and give zero output columns, sliced off). `interpret`: run the kernel in Pallas' interpreter (CPU tests).
    `kernel`: the `_splash_kernel` for these shapes, built outside any `shard_map` (its mask tables are arrays)."""
    if (splash := splash_module()) is None:
        raise AttentionImplError("this jax has no Pallas splash attention (jax.experimental.pallas.ops.tpu)")
    n, t, h, d = q.shape
    s = k.shape[1]
    tp, sp, dp = _padded(t), _padded(s), _padded(d)

    def heads_first(x, length):  # [N, L, h, d] -> [N, h, Lp, dp]
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, dp - d)))

    q = heads_first(q * jnp.asarray(scale, q.dtype), tp)  # splash has no softmax scale: fold it into q
    k, v = heads_first(k, sp), heads_first(v, sp)
    segments = None if sp == s else splash.SegmentIds(q=jnp.zeros((tp,), jnp.int32),
                                                      kv=(jnp.arange(sp) >= s).astype(jnp.int32))
    kernel = _splash_kernel(h, tp, sp, interpret) if kernel is None else kernel
    out = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(q, k, v)
    return jnp.swapaxes(out[:, :, :t, :d], 1, 2)


def mesh_spec(shape: tuple[int, ...]) -> P | None:
    """How `[N, L, h, d]` attention operands split over the mesh of `jax.set_mesh` (None: no mesh, or nothing
    splits): N over the batch axes and 'context' (whose frames are folded into N), heads over 'tensor', each axis
    only where it divides."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    batch, ways = [], 1
    for axis in (*parallel.BATCH_AXES, "context"):
        size = mesh.shape.get(axis, 1)
        if size > 1 and shape[0] % (ways * size) == 0:
            batch.append(axis)
            ways *= size
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and shape[2] % tensor == 0 else None
    return None if not batch and heads is None else P(tuple(batch) or None, None, heads, None)


def shard_over_mesh(fn, q, k, v, spec: P | None = None):
    """`fn(q, k, v)` on each device's block under `jax.shard_map` by `spec` (default `mesh_spec`). A Pallas call
    is opaque to XLA's partitioner, which would otherwise gather its operands onto every device."""
    spec = spec or mesh_spec(q.shape)
    if spec is None:
        return fn(q, k, v)
    mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def pallas_attention(q, k, v, scale: float, *, interpret: bool = False) -> jax.Array:
    """Splash attention over the mesh: the kernel for each device's block is built here, outside `shard_map`."""
    spec = mesh_spec(q.shape)
    heads = q.shape[2] // (jax.sharding.get_abstract_mesh().shape["tensor"] if spec and spec[2] else 1)
    kernel = _splash_kernel(heads, _padded(q.shape[1]), _padded(k.shape[1]), interpret)
    fn = functools.partial(splash_attention, scale=scale, interpret=interpret, kernel=kernel)
    return shard_over_mesh(fn, q, k, v, spec)


def run_attention(kernel: str, q, k, v, *, scale: float, bias=None, interpret: bool = False) -> jax.Array:
    """Attention by the named kernel (`KERNELS`); shapes as in the module docstring."""
    if kernel == "xla":
        return xla_attention(q, k, v, bias, scale)
    if kernel == "cudnn":
        return cudnn_attention(q, k, v, bias, scale)
    if kernel == "cudnn_xla_grad":
        return forward_with_xla_gradient(cudnn_attention, q, k, v, bias, scale)
    if kernel == "pallas":
        if bias is not None:
            raise AttentionImplError("splash attention takes no additive bias")
        return pallas_attention(q, k, v, scale, interpret=interpret)
    raise ValueError(f"unknown attention kernel {kernel!r}: one of {KERNELS}")


def attention(q, k, v, *, scale: float, bias=None, policy: str | None = None, temporal: bool = False) -> jax.Array:
    """Attention under a `model.attention_impl` policy: the kernel `choose_attention_impl` picks for this site on
    this process's platform. Biases are cast to q's dtype (what cuDNN takes; every kernel gets the same bias)."""
    platform, capability = local_platform()
    kernel = choose_attention_impl(policy, platform=platform, dtype=q.dtype, q_len=q.shape[1], kv_len=k.shape[1],
                                   head_dim=q.shape[-1], has_bias=bias is not None, temporal=temporal,
                                   capability=capability,
                                   pallas_available=platform == "tpu" and splash_module() is not None)
    if bias is not None:
        bias = bias.astype(q.dtype)
    return run_attention(kernel, q, k, v, scale=scale, bias=bias)

