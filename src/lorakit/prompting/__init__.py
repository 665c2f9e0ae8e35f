"""Prompting: templates (a conversation -> text), encoding (-> ids + labels), collation."""
