"""Interoperability with the CompVis / Stable Diffusion releases and diffusers: parameter names (``keymaps``),
architectures (``configs``) and readers of every supported source (``sources``). ``ldm.export`` is the entry point."""
