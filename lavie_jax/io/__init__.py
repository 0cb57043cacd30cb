"""Files: self-describing checkpoint directories (`checkpoints`), training work directories (`workdir`), videos
(`video`), tokenizers and prompt encoding (`text`), safe writes (`safe_io`) and key checks (`keycheck`)."""
