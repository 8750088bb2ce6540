"""The parts of `lumina_hf.convert_lumina_mgpt`: reading the published inputs (`sources`), the output config and
tensor plan (`plan`), and writing the folder safely (`output`)."""
