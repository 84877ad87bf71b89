"""asif"""
