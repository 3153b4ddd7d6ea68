"""The built-in dispatcher backends, each imported only when first used."""
