"""The per-batch context-bucket hook: picks the plan's bucket for each batch the SGLang scheduler forms."""
