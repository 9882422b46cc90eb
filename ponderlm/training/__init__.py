"""Training: the trainer loop, its schedules, the run directory it keeps and resumes, and distributed wrapping."""
