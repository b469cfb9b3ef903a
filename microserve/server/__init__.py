"""The engine's HTTP face: the OpenAI API and the microserving API over one AsyncEngine."""
