"""Tests of the paradigm demo (`diffalign.demo`) and its report."""
