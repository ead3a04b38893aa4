"""Forward-mode differentiation of denoisers, below models/ and analysis/ (imports neither).

- attention.py: the one attention-JVP switch (fused SDPA with a forward-mode rule, math fallback),
  attention tangents (torch, Triton in trajlab/kernels).
- fast_jvp.py: JVPs at about two forwards: primal and tangents stacked along the batch through a diffusers
  UNet (op rules in ops.py), and the sampler replayed once on the stacked latent. A model that owns a
  closed-form tangent (``module.tangent(x, T, timestep)``, e.g. the exact worlds) is used through it.
"""
