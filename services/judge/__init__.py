"""The judge service: which of two answers is better by a rubric or a constitution (RLAIF,
Constitutional AI), and the AI labels it publishes."""
