"""bids_llm_encode: do sub-groups of an LLM's artificial neurons behave like brain networks?"""

__version__ = "0.1.0"
