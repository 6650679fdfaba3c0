"""mellum2.train"""
