"""Text-to-SQL: an unmodified openai-SDK agent answering questions over a SQLite shop, learning through Lightwire."""
