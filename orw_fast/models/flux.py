"""FLUX.1 (``FluxPipeline``, ``FluxTransformer2DModel``) as a diffusers family of
:class:`~orw_fast.models.diffusers_flow.DiffusersFlowModel`: conditioning on T5 token embeddings, the pooled CLIP
vector and the text/image position ids, ``timestep`` = sigma, rollouts on ``linspace(1, 1/N, N)`` shifted by the
image's token count, the guidance embedding of guidance-distilled models (no classifier-free guidance), latents
packed 2x2 into a token sequence [(h/2)(w/2), 4C].

The packing is FluxPipeline's: its static helpers ``_prepare_latent_image_ids`` and ``_unpack_latents`` (private;
diffusers has no public API for them) are called here and nowhere else, and tests/test_model_families.py pins what
orw_fast relies on."""

from __future__ import annotations

import numpy as np
import torch

from orw_fast.models.diffusers_flow import DiffusersFlowModel


class FluxFlowModel(DiffusersFlowModel):
    """A FLUX.1 pipeline fine-tuned toward a reward (arguments: :class:`DiffusersFlowModel`); ``guidance_scale`` is
    the guidance embedding's value (guidance-distilled models such as FLUX.1-dev; ignored by others; default 3.5)."""

    family = "flux"
    transformer_class = "FluxTransformer2DModel"
    title = "FLUX.1 (FluxPipeline)"
    default_guidance_scale = 3.5
    default_max_sequence_length = 512

    @classmethod
    def latent_patch(cls, transformer_config):
        return 2, "FLUX's 2x2 latent packing"

    def encode_prompts(self, prompts, device):
        embeds, pooled, self._txt_ids = self.pipe.encode_prompt(
            prompts, None, device=device, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled

    def _prepare_family(self, device):
        side = self.resolution // self.vae_scale
        self._img_ids = self.pipe._prepare_latent_image_ids(1, side // 2, side // 2, device, self.transformer.dtype)

    def sample_shape(self):
        side = self.resolution // self.vae_scale
        return (side // 2 * (side // 2), self.transformer.config.in_channels)

    def _transformer_output(self, module, t, x, embeds, pooled):
        sigma, dtype = 1 - t, self.transformer.dtype
        guidance = (
            torch.full_like(sigma, self.guidance_scale, dtype=torch.float32)
            if self.transformer.config.guidance_embeds
            else None
        )
        out = module(
            hidden_states=x.to(dtype),
            timestep=sigma.to(dtype),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=self._txt_ids,
            img_ids=self._img_ids,
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def _schedule_sigmas(self, steps):
        return np.linspace(1.0, 1 / steps, steps)

    def _latents(self, x):
        return self.pipe._unpack_latents(x, self.resolution, self.resolution, self.vae_scale)
