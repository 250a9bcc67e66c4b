"""Datasets: prompt files and preference files, read into typed records."""
