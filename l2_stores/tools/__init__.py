"""The command-line tool's work: find stores on disk, describe, check, dump and copy them.

These functions know stores only from their files: each store is opened with
raw byte codecs of the sizes its file headers give.
"""
