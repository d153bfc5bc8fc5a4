"""Media sources: fetching URLs safely, uploaded files, local paths."""
