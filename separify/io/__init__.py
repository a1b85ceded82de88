"""Model and data I/O: files (atomic writes, checks), models (load/save), data (tensor files, images), embedded."""
