"""SD3/SD3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``) as a diffusers family of
:class:`~orw_fast.models.diffusers_flow.DiffusersFlowModel`: conditioning on the CLIP-L + CLIP-G (+ T5) token
embeddings and the pooled CLIP vector, ``timestep`` = 1000 sigma, rollouts on the scheduler's own (shifted) sigma
schedule, classifier-free guidance against the negative prompt, latents [C, h, w] cut into the transformer's
patches."""

from __future__ import annotations

import torch

from orw_fast.models.diffusers_flow import DiffusersFlowModel


class SD3FlowModel(DiffusersFlowModel):
    """An SD3/SD3.5 pipeline fine-tuned toward a reward (arguments: :class:`DiffusersFlowModel`); ``guidance_scale``
    is the classifier-free guidance scale of rollouts (1 turns it off; default 7)."""

    family = "sd3"
    transformer_class = "SD3Transformer2DModel"
    title = "SD3/SD3.5 (StableDiffusion3Pipeline)"
    default_guidance_scale = 7.0
    default_max_sequence_length = 256

    @classmethod
    def latent_patch(cls, transformer_config):
        patch = transformer_config.get("patch_size", 2)
        return patch, f"the transformer's {patch}x{patch} patches"

    def encode_prompts(self, prompts, device):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts,
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def sample_shape(self):
        side = self.resolution // self.vae_scale
        return (self.transformer.config.in_channels, side, side)

    def _transformer_output(self, module, t, x, embeds, pooled):
        out = module(
            hidden_states=x.to(self.transformer.dtype),
            timestep=(1 - t) * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        return out.to(x.dtype)

    def guided_velocity(self, module, t, x, embeds, pooled):
        """Classifier-free guidance: uncond + scale (cond - uncond), the negative prompt's velocity as uncond, in one
        transformer call on the doubled batch (as the pipeline does)."""
        if self.guidance_scale == 1:
            return self.velocity(module, t, x, embeds, pooled)
        batch = x.shape[0]
        negative = self._embeds[-1:].expand(batch, -1, -1), self._pooled[-1:].expand(batch, -1)
        both = self._transformer_output(
            module,
            torch.cat([t, t]),
            torch.cat([x, x]),
            torch.cat([negative[0], embeds]),
            torch.cat([negative[1], pooled]),
        )
        uncond, cond = both.chunk(2)
        return -(uncond + self.guidance_scale * (cond - uncond))
