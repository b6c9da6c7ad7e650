"""kdcache.formats: the logit-shard format (FORMAT.md), its codecs, writer, reader and verifier."""
