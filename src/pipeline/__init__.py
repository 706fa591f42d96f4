"""memdistill: does distilling a diffusion model change how much of its training data it memorizes?"""

__version__ = "0.1.0"
