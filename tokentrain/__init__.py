"""tokentrain: token-level training objectives on the Hugging Face stack."""

__version__ = "0.1.0"
