"""The text-to-image branch (the study's Table 3): a latent diffusion backbone (Stable Diffusion v1.5 on a
cluster, a miniature built from config on the embedded digits) fine-tuned until it memorizes, distilled
with latent consistency distillation (LCM), and sampled by both into the shared sample shards.

One concept per module: `backbone` (the frozen tokenizer, text encoder and VAE with the UNet, in
diffusers' folder layout), `tokenizer` (a word-level CLIP tokenizer for the miniature), `latents` (VAE
posteriors and prompt embeddings cached once), `finetune` (the latent denoising objective), `lcm`
(LCM's DDIM solver, boundary scalings, guidance embedding and loss), `generate` (teacher and 4-step
student sampling through diffusers' pipelines), `vae` (training the miniature's autoencoder), `runs`
(the stages the rules run).
"""
