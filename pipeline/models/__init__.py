"""Models by name (smp/timm), their logit-adjusted heads, self-describing checkpoints, plain prediction."""
