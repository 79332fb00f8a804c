"""Interoperability with the CompVis / Stable Diffusion releases and diffusers: parameter names (``keymaps``),
architectures (``configs``). Reading the files of every supported source is ``ldm.checkpoint``'s; ``ldm.export`` is the
entry point."""
