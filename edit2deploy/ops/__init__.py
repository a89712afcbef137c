"""Operations: edit, export, verify, predict, run — each implemented once, used by the CLI and the API."""
