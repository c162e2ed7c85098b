"""The HTTP API (aiohttp), the seed dialects and the CLI: the only package importing aiohttp."""
