"""One module per command that is not a stage of training or a file format: bench, sample, edit_study, and the
WebUI extension and ComfyUI node installers (with the packages they install)."""
