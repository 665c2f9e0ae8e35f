"""Export: merge an adapter into its base model and verify the merged logits."""
