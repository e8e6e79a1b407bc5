"""What sits beside quantization: known models and folders (``models``), perplexity
(``evaluation``) and checkpoint reports (``inspection``), used by the command line."""
