"""Tests for ipcd."""
