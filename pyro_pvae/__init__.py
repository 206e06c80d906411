"""pyro_pvae: PerturbedVAE in Pyro."""
__version__ = "0.1.0"
