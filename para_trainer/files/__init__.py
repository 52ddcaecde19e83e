"""Everything that reads, writes, converts or combines adapter files: export, merge, inspect, metadata."""
