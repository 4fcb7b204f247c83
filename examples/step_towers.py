"""Step a CLIP tower layer by layer and act between blocks.

Every vlsegkit backbone is a *tower*: ``embed`` → ``block(i)`` × N → ``pool`` / ``dense``. This example
builds a tiny random CLIPSeg (no download), then

1. reproduces the tower's pooled embedding by stepping it by hand,
2. inserts four learnable prompt tokens after CLS (VPT-style) and shows the patch grid is unchanged,
3. writes a tiny hook (:class:`vlsegkit.TowerHook`) that records the norm of the residual stream
   before every block, and runs the tower through the one layer loop with it.

Run: ``python examples/step_towers.py``
"""

from __future__ import annotations

import torch

import vlsegkit


class NormRecorder(vlsegkit.TowerHook):
    """A hook on the vision tower acting before every block: it records, and changes nothing."""

    towers = ("vision",)

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.norms: list[float] = []

    def layers(self, tower: str) -> range:
        return range(self.num_layers)

    def forward(self, i, states, ctx):
        self.norms.append(states["vision"].tokens.norm(dim=-1).mean().item())
        return states


def main() -> None:
    torch.manual_seed(0)
    model = vlsegkit.create_model("clipseg-tiny").eval()
    vision = model.vision_tower
    pixels = torch.randn(2, 3, 64, 96)  # any multiple of the patch size, square or not

    with torch.no_grad():
        state = vision.embed(pixels)
        print(f"embedded: tokens {tuple(state.tokens.shape)}, grid {state.grid}")
        for i in range(vision.num_layers):
            state = vision.block(i, state)
        by_hand = vision.pool(state)
        torch.testing.assert_close(by_hand, vision(pixels).pooled)
        print(f"pooled by hand == tower(pixels).pooled, shape {tuple(by_hand.shape)}")

        prompts = torch.zeros(4, vision.width)
        prompted = vision.embed(pixels, prompts=prompts)
        print(
            f"with 4 prompts: tokens {tuple(prompted.tokens.shape)}, "
            f"content tokens {tuple(prompted.content_tokens.shape)}, grid {prompted.grid}"
        )

        recorder = NormRecorder(vision.num_layers)
        vision(pixels, hooks=[recorder])  # embed, the runner with the hook, pool
        print("mean token norm before each block:", [f"{n:.2f}" for n in recorder.norms])


if __name__ == "__main__":
    main()
