"""Files: the one model loader (`store`: converted directories, training runs, random weights), the formats it
reads (`checkpoints`: self-describing `lavie-convert` directories; `workdir`: training work directories), videos
(`video`), tokenizers and prompt encoding (`text`), safe writes (`safe_io`) and key checks (`keycheck`)."""
