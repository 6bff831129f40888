"""Scripts that build the project's artefacts (the shipped model); not part of the dsv3 library."""
