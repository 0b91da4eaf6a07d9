"""The offline teacher-target cache: shard layout, manifest, writer and streaming reader."""
