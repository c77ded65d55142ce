"""The experiment on a Task: stages from calibration to deliverables (pipeline.experiment)."""
