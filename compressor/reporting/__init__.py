"""Reports people look at: summaries, Markdown tables and matplotlib figures."""
